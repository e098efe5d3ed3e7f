"""Gated MLP activations over the kernels of the model's `Kernels` (ops): SiLU (Llama) and the
tanh-approximate GELU (Gemma)."""

from __future__ import annotations

import torch
from torch import nn

from engine.model.quantization.fp8_activation import Fp8Activation
from ops import TORCH_KERNELS, Kernels


class SiluAndMul(nn.Module):
    def __init__(self, kernels: Kernels = TORCH_KERNELS, prefix: str = "") -> None:
        super().__init__()
        self.kernels = kernels
        self.prefix = prefix

    def forward(self, x: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Activation:
        """x: [num_tokens, 2 * d] holding [gate | up] -> silu(gate) * up: [num_tokens, d]; with `fp8`,
        quantized per token in the same launch for the FP8 linear that takes it (fp8_activation)."""
        if fp8:
            return Fp8Activation(*self.kernels.silu_and_mul_fp8(x), x.dtype)
        return self.kernels.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """Gemma's GeGLU activation over the gelu_tanh_and_mul kernel: gelu_tanh(gate) * up."""

    def __init__(self, kernels: Kernels = TORCH_KERNELS, prefix: str = "") -> None:
        super().__init__()
        self.kernels = kernels
        self.prefix = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, 2 * d] holding [gate | up] -> [num_tokens, d]."""
        return self.kernels.gelu_tanh_and_mul(x)
