"""A mixture-of-experts layer's experts, stacked: one parameter for every expert's [gate; up] and one
for every expert's down projection, run by the `fused_moe` op of the model's kernels (ops.reference on
CPU, the Triton grouped GEMM of ops/triton/fused_moe.py on CUDA).

Parameters (per rank):
- `w13_weight` [num_experts, 2 * intermediate / tp, hidden]: expert e's gate rows, then its up rows;
- `w2_weight` [num_experts, hidden, intermediate / tp].

Tensor parallelism shards each expert's intermediate dimension as the dense MLP does (gate/up by
rows, column-parallel; down by columns, row-parallel): every rank holds every expert, each output is
this rank's partial sum, and the caller all-reduces once (after adding any shared expert's partial).

Checkpoint layouts, both accepted (`checkpoint_names`):
- the hub's, one tensor per expert: `<prefix>.<e>.<gate>.weight`, `<up>`, `<down>` with the family's
  names (Qwen: gate_proj / up_proj / down_proj; Mixtral: w1 / w3 / w2, under `block_sparse_moe`,
  which the model renames to `mlp`);
- transformers 5's fused one (its in-memory layout): `<prefix>.gate_up_proj` [E, 2 * I, H] and
  `<prefix>.down_proj` [E, H, I].
A rank narrows each to its slice before copying (a CheckpointSlice reads only that slice).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.model.checkpoint_slice import materialize
from engine.model.parameter import WeightShapeError, set_weight_attrs
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
        shard = self.intermediate_per_partition
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * shard, hidden_size, dtype=params_dtype), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, shard, dtype=params_dtype), requires_grad=False
        )
        for param in (self.w13_weight, self.w2_weight):
            set_weight_attrs(param, {"weight_loader": self.weight_loader})

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
        topk_ids: torch.Tensor,  # [num_tokens, top_k]
    ) -> torch.Tensor:  # [num_tokens, hidden]: this rank's partial sum
        return self.kernels.fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)

    def checkpoint_names(self) -> dict[str, tuple[str, Any]]:
        """Every checkpoint tensor name this layer loads -> (its parameter's attribute, shard_id).
        shard_id (expert, "gate" | "up" | "down") for the hub's per-expert tensors, None for transformers
        5's fused ones (all experts in one tensor)."""
        gate, up, down = self.expert_names
        names: dict[str, tuple[str, Any]] = {
            f"{self.prefix}.gate_up_proj": ("w13_weight", None),
            f"{self.prefix}.down_proj": ("w2_weight", None),
        }
        for e in range(self.num_experts):
            names[f"{self.prefix}.{e}.{gate}.weight"] = ("w13_weight", (e, "gate"))
            names[f"{self.prefix}.{e}.{up}.weight"] = ("w13_weight", (e, "up"))
            names[f"{self.prefix}.{e}.{down}.weight"] = ("w2_weight", (e, "down"))
        return names

    def weight_loader(self, param: torch.Tensor, loaded_weight: Any, shard_id: Any = None) -> None:
        """Copy this rank's slice of one checkpoint tensor (a torch.Tensor or a CheckpointSlice)."""
        size, shard = self.intermediate_size, self.intermediate_per_partition
        start = self.tp_rank * shard  # this rank's first intermediate row (gate/up) or column (down)
        hidden, experts = self.hidden_size, self.num_experts
        if shard_id is None:
            if param is self.w13_weight:  # [E, 2 * I, H]: gate rows then up rows, each narrowed
                _check(loaded_weight, (experts, 2 * size, hidden))
                for half in range(2):
                    src = loaded_weight.narrow(1, half * size + start, shard)
                    param.data.narrow(1, half * shard, shard).copy_(materialize(src))
            else:  # [E, H, I]
                _check(loaded_weight, (experts, hidden, size))
                param.data.copy_(materialize(loaded_weight.narrow(2, start, shard)))
            return
        expert, part = shard_id
        if part == "down":  # [H, I]: this rank's columns
            _check(loaded_weight, (hidden, size))
            param.data[expert].copy_(materialize(loaded_weight.narrow(1, start, shard)))
            return
        _check(loaded_weight, (size, hidden))  # gate or up: [I, H], this rank's rows
        offset = 0 if part == "gate" else shard
        param.data[expert].narrow(0, offset, shard).copy_(materialize(loaded_weight.narrow(0, start, shard)))


def _check(loaded_weight: Any, expected: tuple[int, ...]) -> None:
    if tuple(loaded_weight.shape) != expected:
        raise WeightShapeError(expected, tuple(loaded_weight.shape))
