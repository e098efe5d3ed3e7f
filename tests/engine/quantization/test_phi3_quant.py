"""Quantized Phi-3 checkpoints: their tools quantize qkv_proj and gate_up_proj as the fused modules
the checkpoint stores (one set of scales, zero points and act order per fused module; one FP8
per-tensor scale for all of q, k and v). Every format's loaders split such a tensor into weir's
sub-matrices along the output, converting along the packed axis where the format packs it (GPTQ's
qweight along the input, its qzeros and AWQ's along the output): the loaded weights equal the
dequantized reference exactly and greedy tokens match transformers on it. Online `--quantization fp8`
on a float Phi-3, a tensor-parallel rank's sections, and a skip list naming the fused module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.model.build_context import BuildContext
from engine.model.models.llama import LlamaForCausalLM
from engine.model.quantization.common import dequantize
from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.fp8 import Fp8Config
from engine.model.weight_loader import load_weights
from engine.model_config import ModelConfig
from tests.engine.quantization.checkpoints import FORMATS, write_awq, write_fp8_online_reference, write_gptq
from tests.engine.quantization.parity import assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized
from tests.tiny_models import build_model

# the formats' writers: checkpoints.FORMATS
WRITERS = {
    n: FORMATS[n]
    for n in (
        "gptq-4-g32-act-order",
        "awq-g64",
        "ct-w4a16-g32",
        "ct-fp8-channel",
        "fp8-tensor",
        "fp8-block-64",
    )
}


@pytest.fixture(scope="module")
def wide_phi3_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Phi-3 with hidden 128 (every group size divides its inputs; q 128, k and v 64 rows: whole
    [64, 64] FP8 blocks), partial rotary and longrope as Phi-4-mini."""
    from tests.tiny_models import longrope_parameters

    rope = longrope_parameters(24, 256, factor=1.0, attention_factor=1.1, partial_rotary_factor=0.75)
    return build_model(
        "phi3",
        tmp_path_factory.mktemp("phi3q") / "phi3",
        tiny_tokenizer_dir,
        hidden_size=128,
        intermediate_size=256,
        original_max_position_embeddings=256,
        rope_parameters=rope,
    )


_CACHE: dict[str, tuple[Path, Path]] = {}


def _checkpoint(src: Path, root: Path, name: str) -> tuple[Path, Path]:
    if name not in _CACHE:
        _CACHE[name] = WRITERS[name][1](src, root / name)
    return _CACHE[name]


@pytest.fixture(scope="module")
def quant_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _CACHE.clear()
    return tmp_path_factory.mktemp("phi3-quant")


@pytest.mark.parametrize("name", WRITERS)
def test_quantized_phi3_loads_the_fused_modules_and_matches_transformers(
    wide_phi3_dir: Path, quant_root: Path, name: str
) -> None:
    method = WRITERS[name][0]
    quantized, reference = _checkpoint(wide_phi3_dir, quant_root, name)
    names = list(load_file(str(quantized / "model.safetensors")))
    assert any(".qkv_proj." in n for n in names) and not any(".q_proj." in n for n in names)
    found, _, config = resolve_quantization(quantized, None)
    assert found == method
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, reference) == 2 * 4  # qkv, o, gate_up, down
    assert_parity(quantized, reference, "default", method)


def test_gptq_phi3_tensor_parallel_rank_takes_its_sections(wide_phi3_dir: Path, quant_root: Path) -> None:
    # Without act order (which a row-parallel split refuses for down_proj): rank 1 of 2 holds query
    # heads 2-3 and KV head 1 of the one fused qweight / qzeros / scales, and its halves of gate and up.
    quantized, reference = write_gptq(wide_phi3_dir, quant_root / "tp", 4, 32, False, False, "gptq_v2")
    _, _, quant_config = resolve_quantization(quantized, None)
    config = ModelConfig.from_pretrained(str(quantized), dtype="float32", device="cpu")
    model = LlamaForCausalLM(
        config, BuildContext(dtype=torch.float32, quant_config=quant_config, tp_rank=1, tp_size=2)
    )
    load_weights(model, quantized)
    ref = load_file(str(reference / "model.safetensors"))
    layer = model.model.layers[1]
    q, k, v = ref["model.layers.1.self_attn.qkv_proj.weight"].split([128, 64, 64])
    qkv = layer.self_attn.qkv_proj
    got = dequantize(qkv.codes, qkv.zeros, qkv.scales, qkv.g_idx, torch.float32)
    assert torch.equal(got, torch.cat([q[64:], k[32:], v[32:]]))
    gate, up = ref["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)
    mlp = layer.mlp.gate_up_proj
    got = dequantize(mlp.codes, mlp.zeros, mlp.scales, mlp.g_idx, torch.float32)
    assert torch.equal(got, torch.cat([gate[128:], up[128:]]))


def test_skip_list_naming_the_fused_module_keeps_it_unquantized(
    wide_phi3_dir: Path, quant_root: Path
) -> None:
    quantized, reference = write_awq(wide_phi3_dir, quant_root / "skip", 64, skip=("mlp.gate_up_proj",))
    _, _, config = resolve_quantization(quantized, None)
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, reference) == 2 * 3
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float32


def test_online_fp8_on_a_float_phi3(wide_phi3_dir: Path, tmp_path: Path) -> None:
    model = load_quantized(wide_phi3_dir, Fp8Config(from_checkpoint=False))
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    reference = write_fp8_online_reference(wide_phi3_dir, tmp_path)
    assert assert_weights_match_reference(model, reference) == 2 * 4
    assert_parity(wide_phi3_dir, reference, "default", "fp8", quantization="fp8")
