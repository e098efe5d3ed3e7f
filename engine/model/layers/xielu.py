"""xIELU (Huang & Schlag, 2024; Apertus's MLP activation) with its learned scalars, as transformers'
XIELUActivation computes it in Python (its optional CUDA kernel is the same formula):

    alpha_p = softplus(alpha_p_raw);  alpha_n = beta + softplus(alpha_n_raw)
    y = alpha_p x² + beta x                               where x > 0
    y = (expm1(min(x, eps)) - x) alpha_n + beta x         elsewhere

Each MLP has its own `alpha_p` and `alpha_n` ([1]) and the checkpoint stores `beta` and `eps` ([]) beside them;
all four load from it (transformers keeps beta and eps as buffers in the model dtype, so they are read, not
assumed). Elementwise: under tensor parallelism every rank holds the same four scalars.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.parameter import default_weight_loader, set_weight_attrs


class XIELU(nn.Module):
    def __init__(self, params_dtype: torch.dtype) -> None:
        super().__init__()
        # the values of transformers' initialisation; a checkpoint overwrites all four
        self.alpha_p = nn.Parameter(torch.zeros(1, dtype=params_dtype), requires_grad=False)  # [1]
        self.alpha_n = nn.Parameter(torch.zeros(1, dtype=params_dtype), requires_grad=False)  # [1]
        self.beta = nn.Parameter(torch.tensor(0.5, dtype=params_dtype), requires_grad=False)  # []
        self.eps = nn.Parameter(torch.tensor(-1e-6, dtype=params_dtype), requires_grad=False)  # []
        for p in (self.alpha_p, self.alpha_n, self.beta, self.eps):
            set_weight_attrs(p, {"weight_loader": default_weight_loader})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, intermediate] -> the same shape and dtype."""
        alpha_p = nn.functional.softplus(self.alpha_p)
        alpha_n = self.beta + nn.functional.softplus(self.alpha_n)
        positive = alpha_p * x * x + self.beta * x
        negative = (torch.expm1(torch.minimum(x, self.eps)) - x) * alpha_n + self.beta * x
        return torch.where(x > 0, positive, negative)
