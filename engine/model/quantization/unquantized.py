"""The default: full-precision weights in the model dtype, applied with one matmul."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.parameter import WeightLoader, set_weight_attrs
from engine.model.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig
from engine.model.quantization.float_gemv import (
    SKINNY_MAX_TOKENS,
    SKINNY_MIN_TOKENS,
    decode_gemv_is_allowed,
    float_gemv_linear,
    float_gemv_supported,
    plan_float_gemv,
    plan_gated_gemv,
    plan_skinny_gemm,
    skinny_gemm_linear,
    skinny_gemm_supported,
)

if TYPE_CHECKING:
    from engine.model.layers.linear import LinearBase


class UnquantizedLinearMethod(LinearMethodBase):
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        del input_size, output_size
        # [out_per_partition, in_per_partition], as torch.nn.Linear and HF checkpoints store it
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, "weight_loader": weight_loader})
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # A batch-1 GEMV launch where the sweep found one faster than cuBLAS (float_gemv.py), else None.
        weight = layer.weight
        supported = float_gemv_supported(weight)
        launch = plan_float_gemv(weight.shape[1], weight.shape[0]) if supported else None
        # used only if the layer is a [gate; up] (MergedColumnParallelLinear.silu_mul)
        gated = plan_gated_gemv(weight.shape[1], weight.shape[0]) if supported else None
        layer.float_gemv = launch
        layer.float_gemv_gated = gated
        # 2-16 tokens: the tensor-core skinny GEMM where planned (float_gemv.plan_skinny_gemm), else cuBLAS;
        # the plan first, so with WEIR_SKINNY_GEMM=0 no layer pays for the support check
        skinny = plan_skinny_gemm(weight.shape[1], weight.shape[0])
        layer.skinny_gemm = skinny if skinny is not None and skinny_gemm_supported(weight) else None
        layer.float_gemv_scale = (
            torch.ones(weight.shape[0], dtype=torch.float32, device=weight.device)
            if launch or gated
            else None
        )  # [out]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        launch = getattr(layer, "float_gemv", None)
        if launch is not None and x.numel() == x.shape[-1] and decode_gemv_is_allowed():
            return float_gemv_linear(
                x, layer.weight, layer.float_gemv_scale, bias, launch, getattr(layer, "l2_prefetch", None)
            )
        skinny = getattr(layer, "skinny_gemm", None)
        if skinny is not None and decode_gemv_is_allowed():
            tokens = x.numel() // x.shape[-1]
            if SKINNY_MIN_TOKENS <= tokens <= SKINNY_MAX_TOKENS:
                return skinny_gemm_linear(x, layer.weight, bias, skinny)
        return F.linear(x, layer.weight, bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        launch = getattr(layer, "float_gemv_gated", None)
        if launch is None or x.numel() != x.shape[-1] or not decode_gemv_is_allowed():
            return None
        gated = {**launch, "gated": True}
        return float_gemv_linear(
            x, layer.weight, layer.float_gemv_scale, None, gated, getattr(layer, "l2_prefetch", None)
        )


_UNQUANTIZED = UnquantizedLinearMethod()


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    """Float experts in the model dtype: the hub's per-expert tensors or transformers 5's stacked ones."""

    def create_weights(self, layer: nn.Module, params_dtype: torch.dtype) -> None:
        experts, hidden, shard = layer.num_experts, layer.hidden_size, layer.intermediate_per_partition
        w13 = torch.empty(experts, 2 * shard, hidden, dtype=params_dtype)  # [E, 2 * I / tp, H]
        layer.add_expert_param("w13_weight", w13, "w13", "weight", fused_name="gate_up_proj")
        w2 = torch.empty(experts, hidden, shard, dtype=params_dtype)  # [E, H, I / tp]
        layer.add_expert_param("w2_weight", w2, "w2", "weight", fused_name="down_proj")

    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return layer.kernels.fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids)


class UnquantizedConfig(QuantizationConfig):
    name = "none"

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        del layer, prefix
        return _UNQUANTIZED

    def moe_refusal(self) -> str | None:
        return None

    def get_moe_method(self, layer: nn.Module, prefix: str) -> FusedMoEMethodBase:
        del layer, prefix
        return UnquantizedFusedMoEMethod()
