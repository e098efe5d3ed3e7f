"""LoRA on weir's linear layers, whatever their quantization method.

A `LoRALinear` is attached to a built, loaded linear layer as its `lora` hook (engine.model.layers.
linear calls it on the method's output, before a row-parallel all-reduce), so neither the model file
nor the layer's parameters or method change. It holds every adapter slot's weights, stacked and
zero-padded to max_lora_rank:
    a_stacked [max_loras, num_slices * max_rank, in_per_partition]
    b_stacked [max_loras, out_per_partition, num_slices * max_rank]   (block-diagonal for fused layers)
and adds x @ A[slot]^T @ B[slot]^T for each token's slot, read from the `LoRABatch` every layer
shares: a persistent device tensor, so a CUDA graph captures it as a static input.

Tensor parallelism: column-parallel layers keep A whole and B's rows of this rank; row-parallel
layers keep A's input columns of this rank and B whole (the partial products sum in the all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.lora.adapter import LoRALayerWeights, LoRATarget
from engine.model.layers.linear import LinearBase, QKVParallelLinear, RowParallelLinear


class LoRABatch:
    """The step's per-token adapter slots, shared by every LoRA layer of one model."""

    def __init__(self, max_num_tokens: int, device: torch.device) -> None:
        # [max_num_tokens] int32; -1 = no adapter. Steps write their first num_tokens entries.
        self.token_slots = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device)
        # False when no token of an eager step has an adapter: the layers skip the LoRA term. Graphs
        # are captured with it True, so a replay always runs the kernels (on slot -1 they do nothing).
        self.active = True


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: LinearBase,
        batch: LoRABatch,
        max_loras: int,
        max_rank: int,
        shrink: Callable[..., torch.Tensor],
        expand: Callable[..., torch.Tensor],
    ) -> None:
        super().__init__()
        self.batch = batch
        self.max_rank = max_rank
        self.shrink = shrink
        self.expand = expand
        rank, size = base.tp_rank, base.tp_size
        if isinstance(base, RowParallelLinear):
            in_part = base.input_size_per_partition
            self.in_start = rank * in_part
            self.out_slices = [(0, 0, base.output_size)]  # (offset here, row in the adapter's B, rows)
        else:
            in_part = base.input_size
            self.in_start = 0
            parts = base.output_partition_sizes  # type: ignore[attr-defined]
            offsets = [sum(parts[:i]) for i in range(len(parts))]
            starts = [rank * p for p in parts]
            if isinstance(base, QKVParallelLinear):  # k/v heads may be replicated across ranks
                kv_start = (rank // base.num_kv_head_replicas) * base.kv_size
                starts = [starts[0], kv_start, kv_start]
            self.out_slices = list(zip(offsets, starts, parts, strict=True))
        del size
        self.in_part = in_part
        out_part = sum(n for _, _, n in self.out_slices)
        dim = len(self.out_slices) * max_rank
        dtype = base.params_dtype
        self.register_buffer("a_stacked", torch.zeros(max_loras, dim, in_part, dtype=dtype), persistent=False)
        self.register_buffer(
            "b_stacked", torch.zeros(max_loras, out_part, dim, dtype=dtype), persistent=False
        )

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, in_per_partition], out [num_tokens, out_per_partition] (the base output,
        updated in place) -> out."""
        if not self.batch.active:
            return out
        slots = self.batch.token_slots[: x.shape[0]]
        t = self.shrink(x, self.a_stacked, slots)  # fp32 [(split,) num_tokens, num_slices * max_rank]
        return self.expand(t, self.b_stacked, slots, out)

    @torch.no_grad()
    def set_slot(self, slot: int, weights: LoRALayerWeights | None) -> None:
        """Write one adapter's weights (None: no weights for this layer) into a slot, zero-padded."""
        self.a_stacked[slot].zero_()
        self.b_stacked[slot].zero_()
        if weights is None:
            return
        r_max = self.max_rank
        for i, (a, b) in enumerate(zip(weights.a, weights.b, strict=True)):
            if a is None or b is None:
                continue
            offset, start, rows = self.out_slices[i]
            r = a.shape[0]
            self.a_stacked[slot, i * r_max : i * r_max + r].copy_(
                a[:, self.in_start : self.in_start + self.in_part], non_blocking=True
            )
            self.b_stacked[slot, offset : offset + rows, i * r_max : i * r_max + r].copy_(
                b[start : start + rows], non_blocking=True
            )


def lora_targets(model: nn.Module) -> tuple[dict[str, LoRATarget], dict[str, int]]:
    """The Hugging Face projections of `model` that take LoRA -> where they live in weir, and each
    weir layer's number of sub-matrices. Fused layers are unpacked with the model's
    `packed_modules_mapping` (qkv_proj -> q_proj, k_proj, v_proj)."""
    packed: dict[str, list[tuple[str, object]]] = getattr(model, "packed_modules_mapping", {})
    targets: dict[str, LoRATarget] = {}
    num_slices: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        parent, _, leaf = name.rpartition(".")
        sizes = getattr(module, "output_sizes", [module.output_size])
        if isinstance(module, QKVParallelLinear):  # the checkpoint's k/v rows, not tp x replicated ones
            kv = module.total_num_kv_heads * module.head_size
            sizes = [module.total_num_heads * module.head_size, kv, kv]
        sub_names = [hf for hf, _ in packed[leaf]] if leaf in packed else [leaf]
        if len(sub_names) != len(sizes):
            raise RuntimeError(f"{name}: {len(sizes)} sub-matrices but packed as {sub_names}")
        num_slices[name] = len(sizes)
        for i, (sub, out) in enumerate(zip(sub_names, sizes, strict=True)):
            hf_name = f"{parent}.{sub}" if parent else sub
            targets[hf_name] = LoRATarget(name, i, module.input_size, out)
    return targets, num_slices
