"""SiLU-gated MLP activation over ops.silu_and_mul."""

from __future__ import annotations

import torch
from torch import nn

import ops


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, 2 * d] holding [gate | up] -> silu(gate) * up: [num_tokens, d]."""
        return ops.silu_and_mul(x)
