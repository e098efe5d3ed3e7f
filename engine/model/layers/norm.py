"""RMSNorm over the rms_norm kernel of the model's `Kernels` (ops), with the fused residual add used
between decoder sub-layers; GemmaRMSNorm over gemma_rms_norm (a (1 + weight) scale in float32)."""

from __future__ import annotations

import torch
from torch import nn

from engine.model.parameter import default_weight_loader, set_weight_attrs
from engine.model.quantization.fp8_activation import Fp8Activation
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
        fp8: bool = False,
    ) -> torch.Tensor | Fp8Activation | tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual). With `fp8` the
        norm comes quantized per token, in the same launch, for the FP8 linear that takes it
        (engine.model.quantization.fp8_activation)."""
        if not fp8:
            return self.kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return Fp8Activation(*self.kernels.rms_norm_fp8(x, self.weight, self.eps), x.dtype)
        q, scale, new_residual = self.kernels.rms_norm_fp8(x, self.weight, self.eps, residual)
        return Fp8Activation(q, scale, x.dtype), new_residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm over the gemma_rms_norm kernel: scales by (1 + weight) in float32 (the checkpoint
    stores the offset from 1; a fresh layer's weight is 0, the identity scale). Same calling convention
    as RMSNorm without the fp8 output: a W8A8 projection after it quantizes its input itself."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        params_dtype: torch.dtype | None = None,
        kernels: Kernels = TORCH_KERNELS,
        prefix: str = "",
    ) -> None:
        super().__init__(hidden_size, eps, params_dtype, kernels, prefix)
        self.weight.data.zero_()  # [hidden]: the offset from 1
        # load_format="dummy": the identity scale, not RMSNorm's 1 (which would double every norm)
        set_weight_attrs(self.weight, {"dummy_init": lambda: torch.zeros(hidden_size)})

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        residual: torch.Tensor | None = None,  # [num_tokens, hidden]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        return self.kernels.gemma_rms_norm(x, self.weight, self.eps, residual)


class NonParametricLayerNorm(nn.Module):
    """OLMo 1's norm: LayerNorm without weight or bias, computed in float32 and cast back (transformers'
    OlmoLayerNorm, eps fixed at 1e-5). Plain torch ops on every device (no fused kernel, no residual
    fusion): the family's layers add their residuals themselves."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] -> the same shape and dtype."""
        return nn.functional.layer_norm(x.float(), (self.hidden_size,), None, None, self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (StableLM's), as torch's nn.LayerNorm computes it in the model
    dtype; plain torch ops on every device (no fused kernel, no residual fusion)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)  # [hidden]
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)  # [hidden]
        for p in (self.weight, self.bias):
            set_weight_attrs(p, {"weight_loader": default_weight_loader})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] -> the same shape and dtype."""
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
