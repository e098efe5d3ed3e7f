"""fused_moe's routing alignment in one launch: the Triton twin of ops.triton.fused_moe.moe_align_block_size.

The torch version (the spec, and the CPU path) is about fifteen small kernels; at a decode step each
costs a few microseconds even inside a CUDA graph, more than the grouped GEMMs of a one-token batch (an
H100 at 98de842: 98.6 us for a Qwen3-30B-A3B layer whose GEMMs take ~31 us). This kernel is a single
program that loops over the pairs in chunks of BLOCK and writes the same three tensors, bit for bit:

1. per-expert counts: each chunk's [BLOCK, E_P] one-hot summed over its pairs (E_P: the experts rounded
   up to a power of two, the padding experts never matched);
2. padded starts and ends by a cumsum of the counts rounded up to BLOCK_M; num_padded is their sum;
3. sorted_pairs filled with num_pairs (the padding value) over its whole length, a barrier (threads
   of the one program write the same slots next), then each pair stored at its expert's start + the
   pairs of that expert placed by earlier chunks (a running [E_P] offset read through the one-hot) +
   its rank within the chunk (a [BLOCK, BLOCK] same-expert lower-triangle count): increasing pair index
   within each expert's run, as the spec's stable sort gives;
4. block_expert: for each block start, the number of experts whose padded end is at or before it
   (searchsorted(right=True) over the ascending ends) clamped to num_experts - 1, from a
   [BLOCKS, E_P] compare-and-sum.

One program is sequential over the pairs, so at thousands of tokens the torch ops (each parallel over
the pairs) win: fused_moe picks by the number of pairs (align_kernel_applies there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FILL = 1024  # sorted_pairs slots per fill store
BLOCKS = 32  # block_expert entries per compare-and-sum
MAX_BLOCK = 64  # pairs per chunk at most: keeps the [BLOCK, E_P] one-hot at 64 x 256 for 256 experts


@triton.jit
def _moe_align_kernel(
    topk_ids_ptr,  # [num_pairs] int32 / int64 expert ids, pair = token * top_k + k
    sorted_pairs_ptr,  # [padded] int32
    block_expert_ptr,  # [num_blocks] int32
    num_padded_ptr,  # [1] int32
    num_pairs,
    num_experts,
    padded,
    num_blocks,
    BLOCK_M: tl.constexpr,
    E_P: tl.constexpr,  # num_experts rounded up to a power of two (tl.arange's lengths)
    BLOCK: tl.constexpr,  # pairs per chunk
    FILL: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    experts = tl.arange(0, E_P)
    chunk = tl.arange(0, BLOCK)

    # 1. counts [E_P]; lanes past num_pairs read E_P, which matches no expert
    counts = tl.zeros([E_P], dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK):
        offs = start + chunk
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=E_P).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)

    # 2. padded runs; experts past num_experts count 0, so their ends equal the total
    padded_counts = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded_counts, axis=0)  # [E_P]
    tl.store(num_padded_ptr, tl.sum(padded_counts, axis=0))

    # 3. padding everywhere, then the pairs over it
    for start in range(0, padded, FILL):
        offs = start + tl.arange(0, FILL)
        tl.store(sorted_pairs_ptr + offs, tl.zeros([FILL], dtype=tl.int32) + num_pairs, mask=offs < padded)
    tl.debug_barrier()  # every fill store lands before any pair store to the same slot
    before = chunk[None, :] < chunk[:, None]  # [BLOCK, BLOCK]: pair j precedes pair i in the chunk
    next_slot = padded_end - padded_counts  # [E_P]: each expert's first free slot
    for start in range(0, num_pairs, BLOCK):
        offs = start + chunk
        valid = offs < num_pairs
        ids = tl.load(topk_ids_ptr + offs, mask=valid, other=E_P).to(tl.int32)
        one_hot = ids[:, None] == experts[None, :]  # [BLOCK, E_P]
        rank = tl.sum(((ids[:, None] == ids[None, :]) & before).to(tl.int32), axis=1)  # [BLOCK]
        slot = tl.sum(tl.where(one_hot, next_slot[None, :], 0), axis=1) + rank  # [BLOCK]
        tl.store(sorted_pairs_ptr + slot, offs.to(tl.int32), mask=valid)
        next_slot += tl.sum(one_hot.to(tl.int32), axis=0)

    # 4. each block's expert; past the used length the count reaches num_experts and is clamped
    real = experts < num_experts
    for start in range(0, num_blocks, BLOCKS):
        blocks = start + tl.arange(0, BLOCKS)
        ended = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]) & real[None, :]  # [BLOCKS, E_P]
        expert = tl.minimum(tl.sum(ended.to(tl.int32), axis=1), num_experts - 1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < num_blocks)


def moe_align_block_size_kernel(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ops.triton.fused_moe.moe_align_block_size returns, bit for bit, in one launch. `block`: pairs
    per chunk (a power of two; the tests pass small ones to cover several chunks cheaply)."""
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    padded = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    num_blocks = padded // block_m
    sorted_pairs = torch.empty(padded, dtype=torch.int32, device=device)  # [padded]
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)  # [padded / block_m]
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    # decode batches (a few pairs) get a chunk of their own size: one pass, small one-hots
    block = block or min(MAX_BLOCK, max(16, triton.next_power_of_2(num_pairs)))
    e_p = max(16, triton.next_power_of_2(num_experts))
    _moe_align_kernel[(1,)](
        topk_ids.reshape(-1), sorted_pairs, block_expert, num_padded,
        num_pairs, num_experts, padded, num_blocks,
        BLOCK_M=block_m, E_P=e_p, BLOCK=block, FILL=FILL, BLOCKS=BLOCKS, num_warps=4,
    )  # fmt: skip
    return sorted_pairs, block_expert, num_padded
