"""Split-K without a second launch: the last program of an output tile sums the tile's partials.

A GEMV at batch 1 reads every weight byte once and does little math, so it needs many programs in
flight to keep the memory system busy; the output alone (N / BLOCK_N tiles) gives too few, so K is
split over SPLIT_K programs per tile. Summing their float32 partials in a separate kernel costs a
launch per layer (about a microsecond inside a CUDA graph, several percent of a 4-bit projection).
Instead each program writes its partial, then takes a ticket from a per-tile counter; the one that
draws the last ticket reads all partials, writes the output in its dtype and puts the counter back to
zero, so the next launch (or CUDA-graph replay) finds it clean. The counters are one persistent int32
workspace per device, shared by every layer: launches on one stream never overlap.

Memory order: every thread's partial store happens before the barrier, the ticket is an acq_rel
atomic at GPU scope (its release covers what the barrier made visible), and the reader loads the
partials past L1 (`.cg`), which other SMs' writes do not update.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILES = 16384  # output tiles a split launch may have: N / BLOCK_N, counters in the workspace

_counters: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device) -> torch.Tensor:
    """[MAX_TILES] int32 zeros, one per device, made on first use. The first use is an eager call
    (the warm-up before graph capture), so the workspace never lives in a graph's memory pool."""
    counters = _counters.get(device)
    if counters is None:
        counters = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
        _counters[device] = counters
    return counters


@triton.jit
def store_split_k(
    acc,  # [BLOCK_M, BLOCK_N] float32: this program's share of the tile
    out_ptr,  # [M, N] in the output dtype
    partials_ptr,  # [SPLIT_K, M, N] float32 (unused when SPLIT_K == 1)
    counters_ptr,  # [tiles] int32, zero on entry and on exit
    offs_m,  # [BLOCK_M]
    offs_n,  # [BLOCK_N]
    M,
    N,
    stride_om,
    pid_n,
    pid_k,
    SPLIT_K: tl.constexpr,
):
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tile = offs_m[:, None] * N + offs_n[None, :]  # [BLOCK_M, BLOCK_N] within one partial
        tl.store(partials_ptr + pid_k * M * N + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(counters_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:  # the last of the tile's programs: the others' partials are out
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                total += tl.load(partials_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counters_ptr + pid_n, 0, sem="relaxed", scope="gpu")
