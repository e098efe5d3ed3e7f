"""What the fused MoE op (`fused_moe` in ops.reference and ops.triton.fused_moe) takes besides float
experts: the scales of FP8 experts. Plain data, so both implementations share it.

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
