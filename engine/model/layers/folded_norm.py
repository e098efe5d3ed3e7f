"""A decoder layer's RMSNorm (with its residual add) handed to the linear after it, unapplied.

At one token each norm before qkv and gate_up is a launch of its own (~2.3 us, 64 of a Llama-3-8B step's 65
norms), while the GEMV after it reads the whole input row anyway: with `WEIR_FOLD_NORM=1` the decoder layer
passes `FoldedNorm(x, residual, norm)` instead of the normed row, and a linear whose quant method can apply
the norm inside its GEMV (`LinearMethodBase.apply_folded_norm`: the FP8 / float-weight GEMV,
ops/triton/fp8_gemv.py) does so; any other consumer calls `materialize()`, which runs the norm as before.
Either way the layer then reads `new_residual()`: x + residual, stored by whichever ran the norm.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.layers.norm import RMSNorm
from engine.model.quantization.base import LinearMethodBase
from ops.env_flags import env_flag
from ops.folded_norm import ResidualNorm


class FoldedNorm:
    """norm(x + residual), not yet computed: consumed once, by a GEMV that applies it or by `materialize`."""

    def __init__(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> None:
        self.x = x  # [num_tokens, hidden]: the sub-layer's output
        self.residual = residual  # [num_tokens, hidden]
        self.norm = norm
        self._new_residual: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    def _consume(self, new_residual: torch.Tensor) -> None:
        if self._new_residual is not None:
            raise RuntimeError(f"{self.norm.prefix}: a folded norm is applied once; it was already")
        self._new_residual = new_residual

    def residual_norm(self) -> ResidualNorm:
        """What a GEMV needs to apply the norm itself; the new residual is a fresh buffer it fills."""
        new_residual = torch.empty_like(self.x)  # [num_tokens, hidden]
        self._consume(new_residual)
        return ResidualNorm(self.residual, self.norm.weight, self.norm.eps, new_residual)

    def materialize(self) -> torch.Tensor:  # [num_tokens, hidden]
        """The norm as the layer would have run it: one launch, the normed rows."""
        normed, new_residual = self.norm(self.x, self.residual)
        self._consume(new_residual)
        return normed

    def new_residual(self) -> torch.Tensor:  # [num_tokens, hidden]
        if self._new_residual is None:
            raise RuntimeError(f"{self.norm.prefix}: the folded norm was never applied")
        return self._new_residual


def folds_norm(norm: nn.Module, linear: nn.Module, num_tokens: int) -> bool:
    """Whether a layer hands `norm` to `linear` unapplied: WEIR_FOLD_NORM on, one token, Llama's RMSNorm
    (not Gemma's), a linear without a LoRA adapter and a quant method with a folded path. The linear may
    still decline it at this step (then it materializes the norm: the same launches as without)."""
    return (
        num_tokens == 1
        and type(norm) is RMSNorm
        and getattr(linear, "lora", None) is None
        and type(linear.quant_method).apply_folded_norm is not LinearMethodBase.apply_folded_norm
        and env_flag("WEIR_FOLD_NORM")
    )
