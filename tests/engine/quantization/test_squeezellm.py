"""SqueezeLLM (dense, 4-bit, per-channel lookup tables; reference: SqueezeLLM, squeezellm/quant.py,
QuantLinear.pack, and vLLM v0.5's squeezellm.py, SqueezeLLMLinearMethod): detected from
quant_config.json, loads to exactly the looked-up weights and runs token for token like transformers
on them. The checkpoints are written by tests/engine/quantization/checkpoints.py (write_squeezellm):
SqueezeLLM's own quantizer needs CUDA and is not on PyPI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.squeezellm import SqueezeLLMConfig
from tests.engine.quantization.checkpoints import write_squeezellm
from tests.engine.quantization.parity import assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized


@pytest.fixture(scope="module")
def squeezellm(wide_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_squeezellm(wide_llama_dir, tmp_path_factory.mktemp("squeezellm"))


def test_squeezellm_loads_exactly_the_looked_up_weights(squeezellm: tuple[Path, Path]) -> None:
    quantized, reference = squeezellm
    method, source, config = resolve_quantization(quantized, None)
    assert (method, source, config) == (
        "squeezellm",
        str(quantized / "quant_config.json"),
        SqueezeLLMConfig(4),
    )
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, reference) == 2 * 4
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.codes.dtype == torch.uint8 and qkv.lookup_table.shape == (256, 16)


def test_squeezellm_greedy_parity_with_transformers(squeezellm: tuple[Path, Path]) -> None:
    # (chunked prefill and preemption are method-independent; GPTQ/AWQ/FP8 run them)
    assert_parity(*squeezellm, "default", "squeezellm")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_squeezellm_refusals_name_the_field(squeezellm: tuple[Path, Path], tmp_path: Path) -> None:
    quantized, _ = squeezellm
    bits = _copy(quantized, tmp_path / "bits")
    (bits / "quant_config.json").write_text(json.dumps({"wbits": 3}))
    with pytest.raises(ValueError) as e:
        EngineConfig(model=str(bits), device="cpu").resolve()
    assert str(e.value) == f"{bits / 'quant_config.json'}: wbits=3 is not supported (weir supports 4)"

    sparse = _copy(quantized, tmp_path / "sparse")
    tensors = load_file(str(sparse / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.rows"] = torch.zeros(3, dtype=torch.int32)
    save_file(tensors, str(sparse / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        resolve_quantization(sparse, None)
    assert str(e.value) == (
        "model.safetensors: model.layers.0.mlp.down_proj.rows is a dense-and-sparse SqueezeLLM tensor; "
        "weir reads the dense format only (SqueezeLLM's s0 checkpoints)"
    )

    floats = _copy(quantized, tmp_path / "floats")
    tensors = load_file(str(floats / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.qweight"
    tensors[name] = tensors[name].float()
    save_file(tensors, str(floats / "model.safetensors"))
    _, _, config = resolve_quantization(floats, None)
    with pytest.raises(ValueError) as e:
        load_quantized(floats, config)
    assert str(e.value) == f"{name}: a SqueezeLLM checkpoint stores it as int32; got torch.float32"

    with pytest.raises(
        ValueError, match=r"quantization='awq', but the checkpoint is quantized with 'squeezellm'"
    ):
        resolve_quantization(quantized, "awq")
