"""A mixture-of-experts layer's experts, stacked: one parameter for every expert's [gate; up] and one
for every expert's down projection, run by the `fused_moe` op of the model's kernels (ops.reference on
CPU, the Triton grouped GEMM of ops/triton/fused_moe.py on CUDA).

Parameters (per rank), registered by the layer's method (`quant_method`, from the model's quantization
config: unquantized, engine.model.quantization.fp8_moe or wna16_moe) through `add_expert_param`, which
names their per-expert checkpoint tensors:
- `w13_weight` [num_experts, 2 * intermediate / tp, hidden]: expert e's gate rows, then its up rows;
- `w2_weight` [num_experts, hidden, intermediate / tp];
- a quantized method's tensors (FP8: fp8 weights and scales; integer: codes, zeros, scales), each
  stacked the same way: a stored entry may cover a block of rows and columns (FP8's [128, 128] block
  scales), then each expert's [gate; up] shard must be whole blocks; integer formats convert each
  expert's tensors with loaders of their own.

Tensor parallelism shards each expert's intermediate dimension as the dense MLP does (gate/up by
rows, column-parallel; down by columns, row-parallel): every rank holds every expert, each output is
this rank's partial sum, and the caller all-reduces once (after adding any shared expert's partial).

Checkpoint layouts, both accepted for float experts (`checkpoint_names`; quantized experts: the hub's):
- the hub's, one tensor per expert: `<prefix>.<e>.<gate>.weight`, `<up>`, `<down>` with the family's
  names (Qwen: gate_proj / up_proj / down_proj; Mixtral: w1 / w3 / w2, under `block_sparse_moe`,
  which the model renames to `mlp`);
- transformers 5's fused one (its in-memory layout): `<prefix>.gate_up_proj` [E, 2 * I, H] and
  `<prefix>.down_proj` [E, H, I].
A rank narrows each to its slice before copying (a CheckpointSlice reads only that slice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.model.checkpoint_slice import materialize
from engine.model.parameter import WeightShapeError, set_weight_attrs
from engine.model.quantization.base import FusedMoEMethodBase, QuantizationConfig
from engine.model.quantization.unquantized import UnquantizedFusedMoEMethod
from ops import TORCH_KERNELS, Kernels

# the hub's per-expert names: (gate, up, down)
QWEN_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")


class FusedMoE(nn.Module):
    # The loader only narrows and copies: a tensor-parallel rank may get a CheckpointSlice.
    accepts_checkpoint_slices = True

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
        kernels: Kernels = TORCH_KERNELS,
        expert_names: tuple[str, str, str] = QWEN_EXPERT_NAMES,
        prefix: str = "",
        quant_config: QuantizationConfig | None = None,
        checkpoint_prefix: str | None = None,  # the hub's name of `prefix` (Mixtral: block_sparse_moe)
    ) -> None:
        super().__init__()
        if intermediate_size % tp_size:
            raise ValueError(
                f"moe_intermediate_size ({intermediate_size}) is not divisible by tp_size ({tp_size})"
            )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.intermediate_per_partition = intermediate_size // tp_size
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.kernels = kernels
        self.expert_names = expert_names
        self.prefix = prefix
        self.checkpoint_prefix = checkpoint_prefix or prefix
        # attribute -> (part "w13" | "w2", checkpoint suffix, transformers 5's fused name or None)
        self._expert_params: dict[str, tuple[str, str, str | None]] = {}
        self.quant_method: FusedMoEMethodBase = (
            UnquantizedFusedMoEMethod() if quant_config is None else quant_config.get_moe_method(self, prefix)
        )
        self.quant_method.create_weights(self, params_dtype)

    def checkpoint_module_names(self) -> list[str]:
        """The hub's name of every expert projection this layer holds (for skip lists)."""
        return [
            f"{self.checkpoint_prefix}.{e}.{n}" for e in range(self.num_experts) for n in self.expert_names
        ]

    def add_expert_param(
        self,
        attr: str,
        tensor: torch.Tensor,  # w13: [E, rows of [gate; up], ...]; w2: [E, rows, columns of down]
        part: str,  # "w13": loaded from each expert's gate and up tensors; "w2": from its down tensor
        suffix: str,  # the checkpoint tensor's last name: "weight", "weight_scale", ...
        blocks: tuple[int, int] = (1, 1),  # rows and columns of the weight one stored entry covers
        fused_name: str | None = None,  # transformers 5's stacked tensor (float weights only)
        loader: Callable[..., None] | None = None,  # default: each expert's [blocks] slice, stacked
        dummy_init: Callable[[], torch.Tensor] | None = None,  # random weights: a valid value
    ) -> None:
        param = nn.Parameter(tensor, requires_grad=False)
        attrs: dict[str, Any] = {"weight_loader": loader or self.stacked_loader(part, blocks)}
        if dummy_init is not None:
            attrs["dummy_init"] = dummy_init
        set_weight_attrs(param, attrs)
        self.register_parameter(attr, param)
        self._expert_params[attr] = (part, suffix, fused_name)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
        topk_ids: torch.Tensor,  # [num_tokens, top_k]
    ) -> torch.Tensor:  # [num_tokens, hidden]: this rank's partial sum
        return self.quant_method.apply(self, x, topk_weights, topk_ids)

    def checkpoint_names(self) -> dict[str, tuple[str, Any]]:
        """Every checkpoint tensor name this layer loads -> (its parameter's attribute, shard_id).
        shard_id (expert, "gate" | "up" | "down") for the hub's per-expert tensors, None for transformers
        5's fused ones (all experts in one tensor)."""
        gate, up, down = self.expert_names
        names: dict[str, tuple[str, Any]] = {}
        for attr, (part, suffix, fused_name) in self._expert_params.items():
            if fused_name is not None:
                names[f"{self.prefix}.{fused_name}"] = (attr, None)
            for e in range(self.num_experts):
                if part == "w13":
                    names[f"{self.prefix}.{e}.{gate}.{suffix}"] = (attr, (e, "gate"))
                    names[f"{self.prefix}.{e}.{up}.{suffix}"] = (attr, (e, "up"))
                else:
                    names[f"{self.prefix}.{e}.{down}.{suffix}"] = (attr, (e, "down"))
        return names

    def stacked_loader(self, part: str, blocks: tuple[int, int]) -> Callable[..., None]:
        """Copy this rank's slice of one checkpoint tensor (a torch.Tensor or a CheckpointSlice) whose
        entries each cover `blocks` (rows, columns) of the weight: an expert's gate/up [ceil(I / bn),
        ceil(H / bk)] (this rank's rows) or down [ceil(H / bn), ceil(I / bk)] (its columns)."""
        bn, bk = blocks
        size, hidden = self.intermediate_size, self.hidden_size

        def load(param: torch.Tensor, loaded_weight: Any, shard_id: Any = None) -> None:
            if shard_id is None:  # transformers 5's stacked float weights: [E, 2 * I, H] or [E, H, I]
                _load_fused(param, loaded_weight, self, part)
                return
            expert, projection = shard_id
            if projection == "down":  # this rank's column blocks
                columns = param.shape[2]
                _check(loaded_weight, (-(-hidden // bn), -(-size // bk)))
                param.data[expert].copy_(
                    materialize(loaded_weight.narrow(1, self.tp_rank * columns, columns))
                )
                return
            rows = param.shape[1] // 2  # gate or up: this rank's row blocks
            _check(loaded_weight, (-(-size // bn), -(-hidden // bk)))
            offset = 0 if projection == "gate" else rows
            src = loaded_weight.narrow(0, self.tp_rank * rows, rows)
            param.data[expert].narrow(0, offset, rows).copy_(materialize(src))

        load.slice_owner = self  # type: ignore[attr-defined]  # narrows first: give it CheckpointSlices
        return load


def _load_fused(param: torch.Tensor, loaded_weight: Any, layer: FusedMoE, part: str) -> None:
    size, shard = layer.intermediate_size, layer.intermediate_per_partition
    start = layer.tp_rank * shard  # this rank's first intermediate row (gate/up) or column (down)
    hidden, experts = layer.hidden_size, layer.num_experts
    if part == "w13":  # [E, 2 * I, H]: gate rows, then up rows
        _check(loaded_weight, (experts, 2 * size, hidden))
        for half in range(2):
            src = loaded_weight.narrow(1, half * size + start, shard)
            param.data.narrow(1, half * shard, shard).copy_(materialize(src))
    else:  # [E, H, I]
        _check(loaded_weight, (experts, hidden, size))
        param.data.copy_(materialize(loaded_weight.narrow(2, start, shard)))


def _check(loaded_weight: Any, expected: tuple[int, ...]) -> None:
    if tuple(loaded_weight.shape) != expected:
        raise WeightShapeError(expected, tuple(loaded_weight.shape))
