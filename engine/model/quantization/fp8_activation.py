"""Activations handed to an FP8 W8A8 linear already quantized, by the kernel that made them.

An FP8 linear with dynamic activation scales quantizes its input per token (ops/triton/fp8_quant.py)
before torch._scaled_mm: one more launch per linear, which reads the 16-bit activation the kernel
before it (RMSNorm, SiLU-mul) has just written. On an 8,192-token prefill step of an 8B model those
launches were 5.7 of 109.5 ms of kernels on an H200 (`3ef2c5a`). When the consumer of a norm or of the
MLP's activation is such a linear, the model asks that kernel to quantize in the same launch instead
(`ops.triton.rms_norm.rms_norm_fp8`, `ops.triton.activation.silu_and_mul_fp8`: bit for bit the two
launches) and passes this holder; `Fp8LinearMethod.apply` takes it straight to the GEMM.

Only where the linear would have quantized the same tensor itself: a W8A8 FP8 layer with dynamic
scales on the Triton quantizer (CUDA), no LoRA (the LoRA term needs the 16-bit input), more tokens than
the FP8 GEMV and the FP8 skinny GEMM take (they read 16-bit x), a bfloat16 model. WEIR_FP8_FUSED_QUANT=0 keeps the separate
launches (to compare).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from engine.model.quantization.fp8 import GEMV_MAX_TOKENS, takes_fp8_skinny
from ops.env_flags import env_flag


@dataclass(frozen=True, slots=True)
class Fp8Activation:
    q: torch.Tensor  # [num_tokens, in] float8_e4m3fn
    scale: torch.Tensor  # [num_tokens, 1] float32, per token
    dtype: torch.dtype  # the activation's own dtype, the linear's output dtype


@functools.cache
def _enabled() -> bool:
    return env_flag("WEIR_FP8_FUSED_QUANT")


def takes_fp8_activation(layer: nn.Module, num_tokens: int, dtype: torch.dtype) -> bool:
    """Whether `layer` would quantize an input of `num_tokens` rows of `dtype` per token itself now, so the
    kernel making that input should hand it over quantized."""
    return (
        num_tokens > GEMV_MAX_TOKENS
        and not takes_fp8_skinny(layer, num_tokens)
        and dtype == torch.bfloat16
        and getattr(layer, "fp8_quant_kernel", False)
        and layer.lora is None
        and _enabled()
    )
