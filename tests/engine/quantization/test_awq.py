"""AWQ GEMM checkpoints (reference: AutoAWQ, awq/modules/linear/gemm.py, WQLinear_GEMM.from_linear, and
awq/utils/packing_utils.py, dequantize_gemm) load to exactly the dequantized weights and run token for
token like transformers on them. Written by tests/engine/quantization/checkpoints.py (its docstring
says why not by AutoAWQ/GPTQModel)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.model.quantization.detect import resolve_quantization
from tests.engine.quantization.checkpoints import write_awq
from tests.engine.quantization.parity import SETTINGS, assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized

_CACHE: dict[tuple, tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def awq_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _CACHE.clear()
    return tmp_path_factory.mktemp("awq")


def _checkpoint(src: Path, root: Path, group_size: int, skip: tuple[str, ...] = ()) -> tuple[Path, Path]:
    key = (group_size, skip)
    if key not in _CACHE:
        _CACHE[key] = write_awq(src, root, group_size, skip)
    return _CACHE[key]


@pytest.mark.parametrize("group_size", [64, 128])
def test_awq_loads_exactly_the_dequantized_weights(
    wide_llama_dir: Path, awq_root: Path, group_size: int
) -> None:
    quantized, reference = _checkpoint(wide_llama_dir, awq_root, group_size)
    method, _, config = resolve_quantization(quantized, None)
    assert method == "awq"
    assert assert_weights_match_reference(load_quantized(quantized, config), reference) == 2 * 4


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_awq_greedy_parity_with_transformers(wide_llama_dir: Path, awq_root: Path, setting: str) -> None:
    quantized, reference = _checkpoint(wide_llama_dir, awq_root, 64)
    assert_parity(quantized, reference, setting, "awq")


def test_awq_modules_to_not_convert_stay_in_model_dtype(wide_llama_dir: Path, awq_root: Path) -> None:
    # Fused in weir as qkv_proj: skipping q/k/v together keeps the fused layer unquantized.
    skip = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    quantized, reference = _checkpoint(wide_llama_dir, awq_root, 128, skip)
    _, _, config = resolve_quantization(quantized, None)
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, reference) == 2 * 3
    assert model.model.layers[1].self_attn.qkv_proj.weight.dtype == torch.float32


def test_awq_partly_skipped_fused_layer_is_refused(wide_llama_dir: Path, awq_root: Path) -> None:
    quantized, _ = _checkpoint(wide_llama_dir, awq_root, 128, ("mlp.up_proj",))
    _, _, config = resolve_quantization(quantized, None)
    with pytest.raises(ValueError, match=r"quantizes only some of model\.layers\.0\.mlp\.gate_proj, "):
        load_quantized(quantized, config)


def test_awq_mismatched_packed_tensor_names_parameter_and_shapes(
    wide_llama_dir: Path, awq_root: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    quantized, _ = _checkpoint(wide_llama_dir, awq_root, 64)
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    qweight = tensors["model.layers.0.self_attn.o_proj.qweight"]  # [128, 16]
    tensors["model.layers.0.self_attn.o_proj.qweight"] = qweight[:, :8].contiguous()
    save_file(tensors, str(bad / "model.safetensors"))
    _, _, config = resolve_quantization(bad, None)
    with pytest.raises(
        ValueError,
        match=r"parameter model\.layers\.0\.self_attn\.o_proj\.qweight .*checkpoint has \(128, 8\), the model expects \(128, 16\)",
    ):
        load_quantized(bad, config)


def test_awq_qzeros_of_another_dtype_is_refused_naming_it(
    wide_llama_dir: Path, awq_root: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    quantized, _ = _checkpoint(wide_llama_dir, awq_root, 64)
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.qzeros"
    tensors[name] = tensors[name].to(torch.int64)
    save_file(tensors, str(bad / "model.safetensors"))
    _, _, config = resolve_quantization(bad, None)
    with pytest.raises(
        ValueError,
        match=r"^model\.layers\.1\.self_attn\.qkv_proj\.qzeros: packed zero points must be int32; got torch.int64$",
    ):
        load_quantized(bad, config)
