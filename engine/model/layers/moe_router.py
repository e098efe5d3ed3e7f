"""The mixture-of-experts router: which experts each token goes to, and with what weight.

The router's linear ([num_experts, hidden]) and Qwen2-MoE's shared-expert gate ([1, hidden]) are small,
replicated on every rank (each computes the same routing, so no communication) and never quantized nor
LoRA-adapted: they are plain modules, not engine.model.layers.linear layers, so neither the quantization
methods nor the LoRA machinery see them.

Routing follows transformers exactly: the logits in the model dtype, softmax over all experts in
float32, top_k, then (Mixtral always, Qwen with `norm_topk_prob`) the top_k probabilities divided by
their sum; Qwen then casts them to the model dtype, Mixtral keeps float32. GraniteMoe takes the top_k
of the float32 logits first and softmaxes only those (`softmax_after_topk`: the same weights as the
renormalised ones in exact arithmetic, computed in transformers' order so they round the same).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.parameter import default_weight_loader, set_weight_attrs
from ops import reference
from ops.env_flags import env_flag


class ReplicatedLinear(nn.Module):
    """y = x W^T, W [out, in] whole on every rank, unquantized."""

    def __init__(
        self, input_size: int, output_size: int, params_dtype: torch.dtype, prefix: str = ""
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.weight = nn.Parameter(
            torch.empty(output_size, input_size, dtype=params_dtype), requires_grad=False
        )
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)  # [num_tokens, out]


class TopKRouter(ReplicatedLinear):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        weights_in_model_dtype: bool,
        params_dtype: torch.dtype,
        prefix: str = "",
        softmax_after_topk: bool = False,
    ) -> None:
        super().__init__(hidden_size, num_experts, params_dtype, prefix)
        self.top_k = top_k
        self.renormalize = renormalize
        self.weights_in_model_dtype = weights_in_model_dtype
        self.softmax_after_topk = softmax_after_topk

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [num_tokens, hidden] -> (topk_weights [num_tokens, top_k] float32, topk_ids [num_tokens, top_k]
        int64). Fixed shapes, no host sync: CUDA graphs capture it."""
        logits = self(x)  # [num_tokens, num_experts] in the model dtype, as transformers computes them
        # Qwen multiplies the experts' outputs by weights in the model dtype
        round_to = x.dtype if self.weights_in_model_dtype else None
        route = reference.moe_route
        if route_kernel_applies(logits):
            from ops.triton.moe_route import moe_route as route  # noqa: PLC0415 (triton: only on CUDA)
        return route(logits, self.top_k, self.renormalize, self.softmax_after_topk, round_to)


def route_kernel_applies(logits: torch.Tensor) -> bool:
    """The one-launch routing kernel (ops/triton/moe_route.py) on CUDA unless WEIR_MOE_ROUTE_KERNEL=0
    (on an H100 at 9ae29e1 a Qwen3-30B-A3B-shaped decode step took 4.81 ms with it, 5.58 with the torch
    lines); the torch lines (ops.reference.moe_route, the spec) otherwise. Its weights may differ from torch's in
    the last bit (a sum's order), and among experts of equal probability it takes the lowest indices,
    as torch.topk on CUDA does."""
    if not logits.is_cuda or not env_flag("WEIR_MOE_ROUTE_KERNEL"):
        return False
    from ops.triton.moe_route import MAX_EXPERTS  # noqa: PLC0415 (triton: only on CUDA)

    return logits.shape[-1] <= MAX_EXPERTS
