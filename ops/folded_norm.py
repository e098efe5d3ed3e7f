"""An RMSNorm with its residual add, left for the next linear's GEMV to apply as it reads its input.

At one token a decoder layer's norms are two launches of ~2.3 us each (65 a Llama-3-8B step, 0.15 ms on an
H100, the K1 profile at 09fb917); the GEMV after each (qkv, gate_up) reads the whole input row anyway, so
it can compute norm(x + residual) itself (ops/triton/fp8_gemv.py with `norm`). `ResidualNorm` is what the
GEMV needs; `apply_residual_norm` is its spec, the norm kernel's own reference (ops.reference.rms_norm).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ops import reference


class ResidualNorm(NamedTuple):
    """norm(x + residual) * weight, x + residual stored to new_residual (never residual itself: the GEMV's
    other programs still read it)."""

    residual: torch.Tensor  # [1, K]
    weight: torch.Tensor  # [K]
    eps: float
    new_residual: torch.Tensor  # [1, K], written


def apply_residual_norm(x: torch.Tensor, norm: ResidualNorm) -> torch.Tensor:  # [1, K]
    """The spec: the normed row, x + residual copied into norm.new_residual."""
    out, new_residual = reference.rms_norm(x, norm.weight, norm.eps, norm.residual)
    norm.new_residual.copy_(new_residual)
    return out
