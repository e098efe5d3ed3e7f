"""RMSNorm over the rms_norm kernel of the model's `Kernels` (ops), with the fused residual add used
between decoder sub-layers."""

from __future__ import annotations

import torch
from torch import nn

from engine.model.parameter import default_weight_loader, set_weight_attrs
from ops import TORCH_KERNELS, Kernels


class RMSNorm(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        params_dtype: torch.dtype | None = None,
        kernels: Kernels = TORCH_KERNELS,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.prefix = prefix
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)  # [hidden]
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        residual: torch.Tensor | None = None,  # [num_tokens, hidden]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        return self.kernels.rms_norm(x, self.weight, self.eps, residual)
