"""Quantized checkpoints of the families whose layers differ from Llama's where quantization meets
them: Gemma 2 and 3 (GeGLU after a quantized gate_up, the (1 + w) RMSNorm before every quantized
projection, which has no fp8-output variant, tied embeddings, Gemma 2's final softcap), Granite (biases
on every quantized projection, its multipliers), OLMo 2 (q/k norms after the quantized projections,
post-norms), StarCoder2 (a plain GELU MLP, c_fc and c_proj, biases on every quantized projection,
windowed attention, tied embeddings) and Phi (its output projection `dense`, fc1 / fc2, biases, a parallel
block, a biased LM head left unquantized). Each format's checkpoint (checkpoints.FORMATS, and online `--quantization fp8`) loads to
exactly its dequantized reference and runs token for token like transformers on that reference, logprobs
within 1e-4 (parity.assert_parity). On CPU the FP8 layers dequantize and a W8A8 checkpoint's dynamic
per-token activation scales quantize nothing, as in test_fp8.py and test_compressed_tensors.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.fp8 import Fp8Config
from tests.engine.quantization.checkpoints import FORMATS, write_fp8_online_reference
from tests.engine.quantization.parity import assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized
from tests.tiny_models import read_config

# The tiny models' widths (hidden 64, intermediate 128, 4 heads of 16) take groups of 32 and 64.
GEMMA_FORMATS = ("gptq-4-g32", "awq-g64", "ct-w4a16-g32", "ct-fp8-channel", "fp8-channel", "online-fp8")
CASES = [
    *(("gemma2", f) for f in GEMMA_FORMATS),
    *(("gemma3", f) for f in ("gptq-4-g32", "ct-fp8-channel")),
    ("granite", "gptq-4-g32"),
    ("olmo2", "fp8-channel"),
    *(("starcoder2", f) for f in ("gptq-4-g32", "awq-g64", "online-fp8")),
    *(("phi", f) for f in ("gptq-4-g32", "ct-fp8-channel")),
]


@pytest.mark.parametrize(("family", "fmt"), CASES, ids=[f"{f}-{q}" for f, q in CASES])
def test_quantized_family_loads_its_dequantized_weights_and_matches_transformers(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, family: str, fmt: str
) -> None:
    src = tiny_model_dirs[family]
    layers = read_config(src)["num_hidden_layers"]
    if fmt == "online-fp8":
        method, quantized, options = "fp8", src, {"quantization": "fp8"}
        reference = write_fp8_online_reference(src, tmp_path)
        config = Fp8Config(from_checkpoint=False)
    else:
        method, writer = FORMATS[fmt]
        quantized, reference = writer(src, tmp_path)
        options = {}
        found, _, config = resolve_quantization(quantized, None)
        assert found == method
    model = load_quantized(quantized, config)
    assert (
        assert_weights_match_reference(model, reference) == layers * 4
    )  # qkv, o, gate_up, down (StarCoder2: c_fc, c_proj)
    assert_parity(quantized, reference, "default", method, **options)


@pytest.mark.parametrize("source", ["checkpoint", "online"])
def test_fp8_granite_moe_is_refused_at_start(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, source: str
) -> None:
    """GraniteMoe's experts load only from the float stacked tensors: an FP8 checkpoint and online
    `--quantization fp8` are refused as a GPTQ one is (tests/engine/test_moe.py)."""
    src = tiny_model_dirs["granite_moe"]
    if source == "online":
        model, options, where = src, {"quantization": "fp8"}, "quantization='fp8' (online, per channel)"
    else:
        model, _ = FORMATS["fp8-channel"][1](src, tmp_path)
        options, where = {}, f"{model / 'config.json'} quantization_config"
    with pytest.raises(ValueError) as err:
        EngineConfig(model=str(model), device="cpu", **options).resolve()
    assert str(err.value) == (
        f"quantization 'fp8' ({where}) is not supported for GraniteMoeForCausalLM: its experts load only "
        "from the float stacked tensors (input_linear / output_linear); serve an unquantized checkpoint"
    )
