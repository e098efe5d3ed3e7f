"""LoRA on weir's linear layers, whatever their quantization method.

A `LoRALinear` is attached to a built, loaded linear layer as its `lora` hook (engine.model.layers.
linear calls it on the method's output, before a row-parallel all-reduce), so neither the model file
nor the layer's parameters or method change. It holds every adapter slot's weights, stacked and
zero-padded to max_lora_rank:
    a_stacked [max_loras, num_slices * max_rank, in_per_partition]
    b_stacked [max_loras, out_per_partition, num_slices * max_rank]   (block-diagonal for fused layers)
and adds x @ A[slot]^T @ B[slot]^T for each token's slot, read from the `LoRABatch` every layer
shares: a persistent device tensor, so a CUDA graph captures it as a static input.

The stacks are views into one device tensor the manager owns, [max_loras, slot_numel] (every layer's
A and B of one slot, `bind`), so one slot of every layer is one contiguous region: writing an
adapter into a slot is one host->device copy of a host image of the slot (`write_slot_image`), not
a memset and a handful of copies per layer.

Tensor parallelism: column-parallel layers keep A whole and B's rows of this rank; row-parallel
layers keep A's input columns of this rank and B whole (the partial products sum in the all-reduce).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.lora.adapter import LoRALayerWeights, LoRATarget
from engine.lora.gemv import lora_gemv_linear, plan_lora_gemv
from engine.lora.segments import max_segment_entries, segment_piece
from engine.model.layers.linear import LinearBase, QKVParallelLinear, RowParallelLinear
from engine.model.quantization.float_gemv import decode_gemv_is_allowed
from engine.model.weight_loader import rename_fragments


class LoRABatch:
    """The step's per-token adapter slots, shared by every LoRA layer of one model."""

    def __init__(self, max_num_tokens: int, device: torch.device) -> None:
        # [max_num_tokens] int32; -1 = no adapter. Steps write their first num_tokens entries.
        self.token_slots = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device)
        # False when no token of the step has an adapter: the layers skip the LoRA term (eager), and
        # a CUDA-graph step replays its size's graph captured without it (engine.worker.cuda_graphs).
        # token_slots is then neither read nor written.
        self.active = True
        # The step's runs of tokens on one slot (engine.lora.segments), for the segment kernels:
        # [1 + 3 * max_num_tokens] int32, written with token_slots when `use_segments` (Triton
        # kernels, WEIR_LORA_SEGMENTS not 0). Zero segments until a step writes it (graph capture).
        self.segments = torch.zeros(max_segment_entries(max_num_tokens), dtype=torch.int32, device=device)
        self.use_segments = False


# Regions of a slot start on a multiple of this many elements (>= 16 bytes: Triton specializes
# pointers and strides on 16-byte alignment, so every layer's views get the same compiled kernel).
_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: LinearBase,
        batch: LoRABatch,
        max_loras: int,
        max_rank: int,
        shrink: Callable[..., torch.Tensor],
        expand: Callable[..., torch.Tensor],
        triton_kernels: bool = False,  # shrink/expand are ops.triton's: the fused GEMV may be planned
    ) -> None:
        super().__init__()
        self.batch = batch
        self.max_rank = max_rank
        self.shrink = shrink
        self.expand = expand
        # The one-token GEMV with the expand in its epilogue (engine.lora.gemv), or None.
        self.gemv_launch = plan_lora_gemv(base, triton_kernels)
        self.register_buffer(
            "gemv_scale",
            torch.ones(base.weight.shape[0], dtype=torch.float32, device=base.weight.device)
            if self.gemv_launch is not None
            else None,
            persistent=False,
        )  # [out_per_partition]: the GEMV's unit scale
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
        # Where each sub-matrix's output rows start: the expand skips B's zero blocks with it.
        self.slice_offsets = tuple(offset for offset, _, _ in self.out_slices)
        out_part = sum(n for _, _, n in self.out_slices)
        dim = len(self.out_slices) * max_rank
        self.max_loras = max_loras
        self.a_shape = (dim, in_part)
        self.b_shape = (out_part, dim)
        # Elements of this layer in one slot (A then B, each aligned); `bind` places them.
        self.slot_numel = _aligned(math.prod(self.a_shape)) + _aligned(math.prod(self.b_shape))
        self.offset = 0
        # [max_loras, *a_shape] and [max_loras, *b_shape] views of the manager's slot tensor (`bind`)
        self.register_buffer("a_stacked", None, persistent=False)
        self.register_buffer("b_stacked", None, persistent=False)

    def bind(self, slots: torch.Tensor, offset: int) -> None:
        """Take this layer's stacks as views of `slots` [max_loras, slot_numel of every layer], at
        `offset` (a multiple of the alignment) within each slot."""
        na, nb = math.prod(self.a_shape), math.prod(self.b_shape)
        b_offset = offset + _aligned(na)
        self.offset = offset
        self.a_stacked = slots[:, offset : offset + na].view(self.max_loras, *self.a_shape)
        self.b_stacked = slots[:, b_offset : b_offset + nb].view(self.max_loras, *self.b_shape)

    def fused_gemv_launch(self, x: torch.Tensor) -> dict[str, Any] | None:
        """The launch of the GEMV with the expand in its epilogue when this call takes it, else None:
        a planned layer (unquantized, Triton kernels), a step with adapters, one token, and the
        CUDA-graph warm-up or capture (`decode_gemv_is_allowed`: an eager Triton launch costs more
        host time than it saves)."""
        if self.gemv_launch is None or not self.batch.active or x.numel() != x.shape[-1]:
            return None
        return self.gemv_launch if decode_gemv_is_allowed() else None

    def forward_layer(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output with the LoRA term (before a row-parallel all-reduce): the shrink and the
        GEMV with the expand in its epilogue where `fused_gemv_launch` says so, else the layer's method
        and then `forward`."""
        launch = self.fused_gemv_launch(x)
        if launch is None:
            return self(x, layer.quant_method.apply(layer, x, bias))
        slots = self.batch.token_slots
        return lora_gemv_linear(
            x, layer.weight, self.gemv_scale, bias, self.shrink, self.a_stacked, self.b_stacked, slots,
            self.slice_offsets, launch,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, in_per_partition], out [num_tokens, out_per_partition] (the base output,
        updated in place) -> out."""
        if not self.batch.active:
            return out
        if self.batch.use_segments:  # one program per run of tokens on one adapter
            from ops.triton.lora_segments import lora_expand_segments, lora_shrink_segments  # noqa: PLC0415

            piece = segment_piece(x.shape[0])  # as prepare_step built the segments for this size
            t = lora_shrink_segments(x, self.a_stacked, self.batch.segments, piece)  # fp32 [split, T, S*R]
            return lora_expand_segments(
                t, self.b_stacked, self.batch.segments, out, self.slice_offsets, piece
            )
        slots = self.batch.token_slots[: x.shape[0]]
        t = self.shrink(x, self.a_stacked, slots)  # fp32 [(split,) num_tokens, num_slices * max_rank]
        return self.expand(t, self.b_stacked, slots, out, self.slice_offsets)

    @torch.no_grad()
    def write_slot_image(self, image: torch.Tensor, weights: LoRALayerWeights | None) -> None:
        """Write one adapter's weights for this layer (None: none) into `image`, a host tensor laid
        out as one slot of the slot tensor ([slot_numel of every layer]), zero-padded to max_rank.

        Only the diagonal blocks are written (sub-matrix i: A's rows and B's rows x columns of block
        i); B's off-diagonal blocks of fused layers are zero for every adapter and stay as they are
        (the image starts zeroed). So an image reused for another adapter needs no clearing first."""
        na = math.prod(self.a_shape)
        b_offset = self.offset + _aligned(na)
        a_img = image[self.offset : self.offset + na].view(self.a_shape)
        b_img = image[b_offset : b_offset + math.prod(self.b_shape)].view(self.b_shape)
        r_max = self.max_rank
        for i, (offset, start, rows) in enumerate(self.out_slices):
            a_block = a_img[i * r_max : (i + 1) * r_max]  # [max_rank, in_per_partition]
            b_block = b_img[offset : offset + rows, i * r_max : (i + 1) * r_max]  # [rows, max_rank]
            a = weights.a[i] if weights is not None else None
            b = weights.b[i] if weights is not None else None
            if a is None or b is None:
                a_block.zero_()
                b_block.zero_()
                continue
            r = a.shape[0]
            a_block[:r].copy_(a[:, self.in_start : self.in_start + self.in_part])
            a_block[r:].zero_()
            # The LoRA scaling folded in as B is copied (one pass; B and the image share the dtype).
            torch.mul(b[start : start + rows], weights.scale[i], out=b_block[:, :r])
            b_block[:, r:].zero_()


def lora_targets(model: nn.Module) -> tuple[dict[str, LoRATarget], dict[str, int]]:
    """The Hugging Face projections of `model` that take LoRA -> where they live in weir, and each
    weir layer's number of sub-matrices. Fused layers are unpacked with the model's
    `packed_modules_mapping` (qkv_proj -> q_proj, k_proj, v_proj), except those the model's checkpoints
    fuse themselves (`checkpoint_fused_modules`: Phi-3's qkv_proj and gate_up_proj), which PEFT adapts
    whole: one target for all the layer's sub-matrices."""
    packed: dict[str, list[tuple[str, object]]] = getattr(model, "packed_modules_mapping", {})
    fused_in_checkpoint: tuple[str, ...] = getattr(model, "checkpoint_fused_modules", ())
    # layers no adapter may target (GPT-NeoX's fused q/k/v: its B rows would need the per-head order)
    unsupported: tuple[str, ...] = getattr(model, "lora_unsupported_modules", ())
    # our module names -> the checkpoint's, fragment by fragment (GPT-NeoX: `model.layers.` is `gpt_neox.layers.`)
    hub_names: dict[str, str] = getattr(model, "lora_hub_names", {})
    conv1d = bool(getattr(model, "transposed_checkpoint_weights", ()))  # GPT-2's Conv1D projections

    targets: dict[str, LoRATarget] = {}
    num_slices: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in unsupported:
            continue
        sizes = getattr(module, "output_sizes", [module.output_size])
        if isinstance(module, QKVParallelLinear):  # the checkpoint's k/v rows, not tp x replicated ones
            kv = module.total_num_kv_heads * module.head_size
            sizes = [module.total_num_heads * module.head_size, kv, kv]
        sub_names = [hf for hf, _ in packed[leaf]] if leaf in packed else [leaf]
        if len(sub_names) != len(sizes):
            raise RuntimeError(f"{name}: {len(sizes)} sub-matrices but packed as {sub_names}")
        num_slices[name] = len(sizes)
        if leaf in fused_in_checkpoint:
            targets[rename_fragments(name, hub_names)] = LoRATarget(
                name, 0, module.input_size, sum(sizes), tuple(sizes), conv1d=conv1d
            )
            continue
        # a layer that reorders its checkpoint rows at load (GLM's q/k) says how, per sub-matrix
        row_order = getattr(module, "lora_b_row_order", lambda index: None)
        for i, (sub, out) in enumerate(zip(sub_names, sizes, strict=True)):
            hf_name = rename_fragments(f"{parent}.{sub}" if parent else sub, hub_names)
            targets[hf_name] = LoRATarget(
                name, i, module.input_size, out, b_row_order=row_order(i), conv1d=conv1d
            )
    return targets, num_slices
