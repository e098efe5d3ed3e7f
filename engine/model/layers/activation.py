"""SiLU-gated MLP activation over the silu_and_mul kernel of the model's `Kernels` (ops)."""

from __future__ import annotations

import torch
from torch import nn

from ops import TORCH_KERNELS, Kernels


class SiluAndMul(nn.Module):
    def __init__(self, kernels: Kernels = TORCH_KERNELS, prefix: str = "") -> None:
        super().__init__()
        self.kernels = kernels
        self.prefix = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, 2 * d] holding [gate | up] -> silu(gate) * up: [num_tokens, d]."""
        return self.kernels.silu_and_mul(x)
