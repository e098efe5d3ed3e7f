"""FP8 experts of a mixture-of-experts layer: `quant_method: "fp8"` checkpoints, compressed-tensors'
float-quantized ones, and online `quantization="fp8"` (engine.model.quantization.fp8 for the dense
layers and the formats' tensors).

Checkpoint tensors, per expert projection (the hub's per-expert layout: Qwen's
`mlp.experts.<e>.{gate,up,down}_proj`, Mixtral's `block_sparse_moe.experts.<e>.{w1,w3,w2}`):
- `weight` float8_e4m3fn [out, in];
- `weight_scale` float32: one per tensor ([] or [1], e.g. Mixtral-8x7B FP8) or per output channel
  ([out] or [out, 1]); or, with `weight_block_size` [bn, bk] (e.g. Qwen3-30B-A3B-FP8's [128, 128]),
  `weight_scale_inv` (compressed-tensors' block strategy: `weight_scale`) [ceil(out / bn), ceil(in / bk)],
  which multiplies despite its name (w = weight * scale, DeepSeek-V3's convention);
- with `activation_scheme: "static"`: `input_scale`, one number per projection. As vLLM does for
  FP8 MoE, one scale per GEMM of the layer: the largest over every expert's gate and up (they share
  the input), and over every expert's down.
Online: the float experts are loaded, then quantized per expert and output channel (amax / 448).

After loading the layer holds `w13_weight` / `w2_weight` float8_e4m3fn and their scales `w13_scale` /
`w2_scale` (per channel [E, N, 1], per-tensor scales repeated over their rows; or the block scales
[E, N / bn, K / bk]), `a13_scale` / `a2_scale` (static input scales, else None); the fused MoE op
(ops.moe_quant.Fp8ExpertScales) dequantizes the weights in its inner loop (W8A16; a W8A8 path on FP8
tensor cores is not written yet). The router stays unquantized (engine.model.layers.moe_router).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.model.checkpoint_slice import materialize
from engine.model.parameter import WeightShapeError
from engine.model.quantization.base import FusedMoEMethodBase
from engine.model.quantization.fp8 import FP8_DTYPE, FP8_MAX, quantize_per_channel
from engine.model.quantization.unquantized import UnquantizedFusedMoEMethod
from ops.moe_quant import Fp8ExpertScales

if TYPE_CHECKING:
    from engine.model.quantization.fp8 import Fp8Config


class Fp8FusedMoEMethod(FusedMoEMethodBase):
    def __init__(self, config: Fp8Config) -> None:
        self.config = config
        self.block_shape = config.weight_block_size if config.from_checkpoint else None

    def create_weights(self, layer: nn.Module, params_dtype: torch.dtype) -> None:
        cfg = self.config
        if not cfg.from_checkpoint:  # online: the float experts, quantized after loading
            UnquantizedFusedMoEMethod().create_weights(layer, params_dtype)
            return
        experts, hidden, shard = layer.num_experts, layer.hidden_size, layer.intermediate_per_partition
        for attr, part, shape in (
            ("w13_weight", "w13", (2 * shard, hidden)),
            ("w2_weight", "w2", (hidden, shard)),
        ):
            layer.add_expert_param(
                attr,
                torch.empty(experts, *shape, dtype=FP8_DTYPE),
                part,
                "weight",
                loader=_fp8_only(layer, layer.stacked_loader(part, (1, 1))),
                dummy_init=_dummy_fp8((experts, *shape)),  # random weights: uniform_ has no fp8 kernel
            )
        if self.block_shape is not None:
            bn, bk = self.block_shape
            if shard % bn:
                raise ValueError(
                    f"FP8 MoE layer {layer.prefix}: each expert's intermediate rows per rank ({shard}) are not "
                    f"a multiple of weight_block_size[0] {bn}"
                    + (
                        f" (moe_intermediate_size {layer.intermediate_size} over {layer.tp_size} ranks)"
                        if layer.tp_size > 1
                        else ""
                    )
                )
            if layer.tp_size > 1 and shard % bk:
                raise ValueError(
                    f"FP8 MoE layer {layer.prefix}: each expert's down projection input per rank ({shard}) is "
                    f"not a multiple of weight_block_size[1] {bk}; choose a tensor_parallel_size that keeps "
                    "whole blocks"
                )
            down_columns = shard // bk if layer.tp_size > 1 else -(-shard // bk)
            for attr, part, shape in (
                ("w13_weight_scale", "w13", (2 * shard // bn, -(-hidden // bk))),
                ("w2_weight_scale", "w2", (-(-hidden // bn), down_columns)),
            ):
                layer.add_expert_param(
                    attr,
                    torch.empty(experts, *shape, dtype=torch.float32),
                    part,
                    cfg.block_scale_name,
                    blocks=(bn, bk),
                    dummy_init=_dummy_scale((experts, *shape)),
                )
        else:
            for attr, part, rows in (
                ("w13_weight_scale", "w13", 2 * shard),
                ("w2_weight_scale", "w2", hidden),
            ):
                layer.add_expert_param(
                    attr,
                    torch.empty(experts, rows, dtype=torch.float32),  # per output row: scalars repeated
                    part,
                    "weight_scale",
                    loader=_channel_scale_loader(layer),
                    dummy_init=_dummy_scale((experts, rows)),
                )
        if cfg.static_activations:
            for attr, part in (("w13_input_scale", "w13"), ("w2_input_scale", "w2")):
                layer.add_expert_param(
                    attr,
                    torch.zeros(1),
                    part,
                    "input_scale",
                    loader=_max_input_scale_loader(layer),
                    dummy_init=lambda: torch.full((1,), 0.05),
                )

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        cfg = self.config
        for part in ("w13", "w2"):
            weight = getattr(layer, f"{part}_weight").data  # [E, N, K]
            if not cfg.from_checkpoint:
                experts, n, k = weight.shape
                q, scale = quantize_per_channel(weight.reshape(experts * n, k))
                weight, scale = q.view(experts, n, k), scale.view(experts, n, 1)
            else:
                scale = getattr(layer, f"{part}_weight_scale").data
                delattr(layer, f"{part}_weight_scale")
                if self.block_shape is None:
                    scale = scale.unsqueeze(2)  # [E, N, 1]
            delattr(layer, f"{part}_weight")
            layer.register_parameter(f"{part}_weight", nn.Parameter(weight, requires_grad=False))
            layer.register_buffer(f"{part}_scale", scale.contiguous())
            input_scale = None
            if cfg.static_activations:
                input_scale = getattr(layer, f"{part}_input_scale").data.reshape(1)  # [1] float32
                if not (torch.isfinite(input_scale).all() and (input_scale > 0).all()):
                    raise ValueError(
                        f"FP8 MoE layer {layer.prefix}: the {part} input_scale must be positive; got "
                        f"{input_scale.item()}"
                    )
                delattr(layer, f"{part}_input_scale")
            layer.register_buffer("a13_scale" if part == "w13" else "a2_scale", input_scale)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        scales = Fp8ExpertScales(
            layer.w13_scale, layer.w2_scale, self.block_shape, layer.a13_scale, layer.a2_scale
        )
        return layer.kernels.fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, scales)


def _tensor_name(layer: nn.Module, shard_id: Any, suffix: str) -> str:
    expert, projection = shard_id
    gate, up, down = layer.expert_names
    name = {"gate": gate, "up": up, "down": down}[projection]
    return f"{layer.checkpoint_prefix}.{expert}.{name}.{suffix}"


def _fp8_only(layer: nn.Module, loader: Any) -> Any:
    def load(param: torch.Tensor, loaded_weight: Any, shard_id: Any = None) -> None:
        if loaded_weight.dtype != FP8_DTYPE:
            raise ValueError(
                f"{_tensor_name(layer, shard_id, 'weight')}: an fp8 checkpoint's weight must be float8_e4m3fn; "
                f"got {loaded_weight.dtype}"
            )
        loader(param, loaded_weight, shard_id)

    load.slice_owner = layer  # type: ignore[attr-defined]  # the stacked loader narrows first
    return load


def _channel_scale_loader(layer: nn.Module) -> Any:
    """An expert projection's weight_scale into its rows of [E, 2 * I / tp] (gate, up) or [E, H] (down):
    a per-tensor scalar fills them, per-channel scales ([out] or [out, 1]) are this rank's rows."""

    def load(param: torch.Tensor, loaded_weight: Any, shard_id: Any = None) -> None:
        expert, projection = shard_id
        shard = layer.intermediate_per_partition
        first, rows = (
            (0, param.shape[1]) if projection == "down" else ((0 if projection == "gate" else shard), shard)
        )
        target = param.data[expert].narrow(0, first, rows)
        if loaded_weight.numel() == 1:
            target.fill_(materialize(loaded_weight).float().reshape(()))
            return
        full = layer.hidden_size if projection == "down" else layer.intermediate_size
        values = materialize(loaded_weight).reshape(-1).float()
        if values.numel() != full:
            raise WeightShapeError((full,), tuple(loaded_weight.shape))
        start = 0 if projection == "down" else layer.tp_rank * shard
        target.copy_(values.narrow(0, start, rows))

    load.slice_owner = layer  # type: ignore[attr-defined]  # small: read whole
    return load


def _max_input_scale_loader(layer: nn.Module) -> Any:
    """A static input scale per GEMM: the largest over the layer's experts (and gate / up)."""

    def load(param: torch.Tensor, loaded_weight: Any, shard_id: Any = None) -> None:
        if loaded_weight.numel() != 1:
            raise ValueError(
                f"{_tensor_name(layer, shard_id, 'input_scale')}: a static input scale is one number; got "
                f"shape {tuple(loaded_weight.shape)}"
            )
        value = materialize(loaded_weight).float().reshape(1).to(param.device)
        param.data.copy_(torch.maximum(param.data, value))

    load.slice_owner = layer  # type: ignore[attr-defined]  # reads whole scalars only
    return load


def _dummy_fp8(shape: tuple[int, ...]) -> Any:
    return lambda: (torch.rand(shape) * 2 - 1).mul_(FP8_MAX / 4).to(FP8_DTYPE)


def _dummy_scale(shape: tuple[int, ...]) -> Any:
    return lambda: torch.full(shape, 1e-3 / FP8_MAX * 4)  # weights within +-1e-3, as float dummies
