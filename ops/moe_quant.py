"""What the fused MoE op (`fused_moe` in ops.reference and ops.triton.fused_moe) takes besides float
experts: the scales of FP8 experts, or of integer (GPTQ / AWQ / compressed-tensors W4A16, W8A16)
experts. Plain data, so both implementations share it.

FP8 experts (W8A16: the weights dequantized to the activation dtype, the activations not quantized):
w13 / w2 are float8_e4m3fn [E, N, K] and expert e's weight is w[e, n, k] * scale[e, n // bn, k // bk],
rounded to the activation dtype; per output channel the scales are [E, N, 1] (`block_shape` None), per
block [E, ceil(N / bn), ceil(K / bk)]. A static input scale (`activation_scheme: "static"`, one number
per GEMM) makes each GEMM's input what an FP8 GEMM would read: fp8(x / s) * s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Fp8ExpertScales:
    w13: torch.Tensor  # [E, 2 * I, 1] per channel, or [E, 2 * I / bn, ceil(H / bk)] float32
    w2: torch.Tensor  # [E, H, 1] per channel, or [E, ceil(H / bn), ceil(I / bk)] float32
    block_shape: tuple[int, int] | None  # (bn, bk); None: one scale per output channel
    a13: torch.Tensor | None = None  # [1] float32: static input scale of [gate; up]; None: not quantized
    a2: torch.Tensor | None = None  # [1] float32: static input scale of down


@dataclass(frozen=True, slots=True)
class IntExpertScales:
    """Integer experts (weight-only W4A16 / W8A16): w13 / w2 are int32 [E, N, K / pf] (pf = 32 // bits
    codes a word, packed along K, the first column in the lowest bits: compressed-tensors' layout), and
    expert e's weight is (code[e, n, k] - zeros[e, n, g]) * scales[e, n, g], g = k // (K / G), computed in
    float32 and rounded once to the activation dtype (GPTQ's dequantization, engine.model.quantization.
    common.dequantize)."""

    bits: int  # 4 or 8
    w13_scales: torch.Tensor  # [E, 2 * I, G13] float32
    w13_zeros: torch.Tensor  # [E, 2 * I, G13] float32 (integers)
    w2_scales: torch.Tensor  # [E, H, G2] float32
    w2_zeros: torch.Tensor  # [E, H, G2] float32
    # [E, H] int32: act order (GPTQ desc_act, compressed-tensors actorder "group"), each expert's [gate; up] codes stored with their input
    # columns in group order; its GEMM reads x[:, w13_perm[e]] (down's order is folded into the
    # intermediate's, engine.model.quantization.wna16_moe). None: the checkpoint's order.
    w13_perm: torch.Tensor | None = None
