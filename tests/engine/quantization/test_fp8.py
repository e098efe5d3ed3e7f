"""FP8 weights: `quant_method: "fp8"` checkpoints (reference: vLLM,
vllm/model_executor/layers/quantization/fp8.py, Fp8LinearMethod; block-wise as DeepSeek-V3's
inference/kernel.py weight_dequant: weight * scale_inv per [128, 128] block) and online
`quantization="fp8"`. On CPU weir dequantizes, so it must match transformers on the dequantized
float32 weights token for token. Checkpoints written by tests/engine/quantization/checkpoints.py:
compressed-tensors could write float-quantized checkpoints, but that is its own format
(quant_method "compressed-tensors"), not this one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.fp8 import Fp8Config
from tests.engine.quantization.checkpoints import fp8_online_reference, write_fp8, write_fp8_online_reference
from tests.engine.quantization.parity import assert_parity
from tests.engine.quantization.weights import assert_weights_match_reference, load_quantized

_CACHE: dict[tuple, tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def fp8_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _CACHE.clear()
    return tmp_path_factory.mktemp("fp8")


def _checkpoint(
    src: Path, root: Path, scheme: str, skip: tuple[str, ...] = (), block: tuple[int, int] = (128, 128)
) -> tuple[Path, Path]:
    key = (str(src), scheme, skip, block)
    if key not in _CACHE:
        _CACHE[key] = write_fp8(src, root / str(len(_CACHE)), scheme, block, skip)
    return _CACHE[key]


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_fp8_loads_exactly_the_dequantized_weights(
    wider_llama_dir: Path, fp8_root: Path, scheme: str
) -> None:
    quantized, reference = _checkpoint(wider_llama_dir, fp8_root, scheme)
    method, _, config = resolve_quantization(quantized, None)
    assert method == "fp8"
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, reference) == 2 * 4
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize(
    ("scheme", "setting"), [("tensor", "default"), ("tensor", "preemption"), ("block", "default")]
)
def test_fp8_greedy_parity_with_transformers(
    wide_llama_dir: Path, fp8_root: Path, scheme: str, setting: str
) -> None:
    # The hidden-128 model (faster than the 256 one): [64, 64] blocks divide its k/v outputs; the
    # [128, 128] case is checked weight for weight above.
    quantized, reference = _checkpoint(wide_llama_dir, fp8_root, scheme, block=(64, 64))
    assert_parity(quantized, reference, setting, "fp8")


def test_fp8_ignored_layers_stay_in_model_dtype(wider_llama_dir: Path, fp8_root: Path) -> None:
    quantized, reference = _checkpoint(wider_llama_dir, fp8_root, "channel", ("mlp.gate_proj", "mlp.up_proj"))
    _, _, config = resolve_quantization(quantized, None)
    model = load_quantized(quantized, config)
    assert assert_weights_match_reference(model, reference) == 2 * 3
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float32


def test_fp8_block_size_must_divide_fused_outputs(wide_llama_dir: Path, fp8_root: Path) -> None:
    # hidden 128: k and v have 64 output rows each, half a 128-row block
    quantized, _ = _checkpoint(wide_llama_dir, fp8_root, "block")
    _, _, config = resolve_quantization(quantized, None)
    with pytest.raises(
        ValueError,
        match=r"FP8 layer model\.layers\.0\.self_attn\.qkv_proj: output sizes \[128, 64, 64\] are not multiples of weight_block_size\[0\] 128",
    ):
        load_quantized(quantized, config)


def test_online_fp8_quantizes_per_channel_at_load(wide_llama_dir: Path, tmp_path: Path) -> None:
    model = load_quantized(wide_llama_dir, Fp8Config(from_checkpoint=False))
    layer = model.model.layers[1].mlp.down_proj
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.shape == (128,)
    original = load_file(str(wide_llama_dir / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    got = layer.weight.float() * layer.weight_scale[:, None]
    assert torch.equal(got, fp8_online_reference(original))
    # e4m3 keeps 3 mantissa bits: every weight within 1/16 relative of the original (plus tiny ones)
    assert ((got - original).abs() <= original.abs() / 16 + 1e-3).all()
    reference = write_fp8_online_reference(wide_llama_dir, tmp_path)
    assert_weights_match_reference(model, reference)
    assert_parity(wide_llama_dir, reference, "default", "fp8", quantization="fp8")


def test_fp8_weight_of_another_dtype_is_refused_naming_it(
    wide_llama_dir: Path, fp8_root: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import save_file

    quantized, _ = _checkpoint(wide_llama_dir, fp8_root, "tensor", block=(64, 64))
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.bfloat16)
    save_file(tensors, str(bad / "model.safetensors"))
    _, _, config = resolve_quantization(bad, None)
    with pytest.raises(
        ValueError, match=rf"^{name}: an fp8 checkpoint's weight must be float8_e4m3fn; got torch.bfloat16$"
    ):
        load_quantized(bad, config)


def test_fp8_static_activation_scales_quantize_the_input(wide_llama_dir: Path, fp8_root: Path) -> None:
    """activation_scheme "static": each layer's input is quantized to fp8 with its input_scale (a fused
    layer's: the largest of its modules', vLLM's choice), on CPU as on the FP8 GEMM."""
    import torch.nn.functional as F

    quantized, reference = write_fp8(wide_llama_dir, fp8_root / "static", "channel", static=True)
    _, _, config = resolve_quantization(quantized, None)
    assert config == Fp8Config(from_checkpoint=True, static_activations=True)
    model = load_quantized(quantized, config)
    assert_weights_match_reference(model, reference)
    stored = load_file(str(quantized / "model.safetensors"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    scales = [stored[f"model.layers.0.self_attn.{p}_proj.input_scale"].item() for p in "qkv"]
    assert len(set(scales)) > 1 and qkv.input_scale.item() == max(scales)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    s = qkv.input_scale
    x_fp8 = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    w = qkv.weight.float() * qkv.weight_scale[:, None]
    assert torch.equal(qkv.quant_method.apply(qkv, x), F.linear(x_fp8, w))
    assert not torch.equal(F.linear(x_fp8, w), F.linear(x, w))  # the input really is quantized
