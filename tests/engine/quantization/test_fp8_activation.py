"""Activations quantized by the kernel that made them (engine.model.quantization.fp8_activation): when a
W8A8 FP8 linear takes them, and that its GEMM on them is the GEMM it runs on the 16-bit input it would
have quantized itself. (The kernels: tests/ops/test_fp8_quant.py; on CUDA, the feature check's FP8
checkpoints and bench_quant's Q3 run the whole path.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.model.quantization import fp8_activation
from engine.model.quantization.fp8 import Fp8Config, Fp8LinearMethod, _scaled_mm_linear
from engine.model.quantization.fp8_activation import Fp8Activation, takes_fp8_activation
from ops import reference


def _fp8_layer(quant_kernel: bool = True, lora: object = None) -> nn.Module:
    """A linear with what Fp8LinearMethod.process_weights_after_loading leaves on a CUDA W8A8 layer."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Module()
    w = torch.randn(48, 64, generator=gen)
    layer.weight_scale = w.abs().amax(dim=1) / 448.0  # [out] float32, per channel
    layer.weight = (w / layer.weight_scale[:, None]).to(torch.float8_e4m3fn)  # [out, in]
    layer.input_scale = None
    layer.fp8_scaled_mm = layer.fp8_gemv = True
    layer.fp8_quant_kernel = quant_kernel
    layer.fp8_fast_accum = False
    layer.lora = lora
    return layer


def test_which_inputs_come_quantized(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _fp8_layer()
    assert takes_fp8_activation(layer, 3, torch.bfloat16)
    assert not takes_fp8_activation(layer, 2, torch.bfloat16)  # the FP8 GEMV's sizes read 16-bit x
    assert not takes_fp8_activation(layer, 64, torch.float16)  # _scaled_mm runs bfloat16 activations only
    assert not takes_fp8_activation(_fp8_layer(quant_kernel=False), 64, torch.bfloat16)  # static scale, CPU
    assert not takes_fp8_activation(_fp8_layer(lora=object()), 64, torch.bfloat16)  # LoRA needs 16-bit x
    assert not takes_fp8_activation(nn.Linear(4, 4), 64, torch.bfloat16)  # not an FP8 layer
    monkeypatch.setenv("WEIR_FP8_FUSED_QUANT", "0")
    fp8_activation._enabled.cache_clear()
    try:
        assert not takes_fp8_activation(layer, 64, torch.bfloat16)
    finally:
        monkeypatch.delenv("WEIR_FP8_FUSED_QUANT")
        fp8_activation._enabled.cache_clear()


@pytest.mark.parametrize("with_bias", [False, True])
def test_apply_on_a_quantized_activation_is_the_gemm_on_the_16_bit_one(with_bias: bool) -> None:
    """apply(Fp8Activation) == apply(x) where x would have been quantized to the same bits (torch's
    _scaled_mm runs on CPU too)."""
    layer = _fp8_layer()
    method = Fp8LinearMethod(Fp8Config(from_checkpoint=True))
    x = (torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)  # [5, 64]
    bias = torch.randn(48).to(torch.bfloat16) if with_bias else None
    q, scale = reference.per_token_fp8(x)
    fused = method.apply(layer, Fp8Activation(q, scale, x.dtype), bias)
    plain = _scaled_mm_linear(x, layer.weight, layer.weight_scale, bias, None, quant_kernel=False)
    assert fused.dtype == torch.bfloat16 and fused.shape == (5, 48)
    assert torch.equal(fused, plain)


def test_fast_accumulation_reaches_the_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer loaded with WEIR_FP8_FAST_ACCUM=1 (fp8_fast_accum) asks _scaled_mm for use_fast_accum, on
    both the quantized-activation and the 16-bit path, and not where the flag is off."""
    seen: list[bool] = []
    real = torch._scaled_mm

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(bool(kwargs.get("use_fast_accum")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    method = Fp8LinearMethod(Fp8Config(from_checkpoint=True))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    q, scale = reference.per_token_fp8(x)
    layer = _fp8_layer(quant_kernel=False)  # x quantized by the torch lines (the kernel is CUDA's)
    method.apply(layer, Fp8Activation(q, scale, x.dtype))
    layer.fp8_fast_accum = True
    method.apply(layer, Fp8Activation(q, scale, x.dtype))
    method.apply(layer, x)  # 5 rows: past the GEMV's sizes, the 16-bit path quantizes x itself
    assert seen == [False, True, True]
