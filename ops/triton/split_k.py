"""Split-K without a second launch: the last program of an output tile sums the tile's partials.

A GEMV at batch 1 reads every weight byte once and does little math, so it needs many programs in
flight to keep the memory system busy; the output alone (N / BLOCK_N tiles) gives too few, so K is
split over SPLIT_K programs per tile. Summing their float32 partials in a separate kernel costs a
launch per layer (about a microsecond inside a CUDA graph, several percent of a 4-bit projection).
Instead each program writes its partial (`finish_row`), then takes a ticket from a per-tile counter
(`split_k_is_last`); the one that draws the last ticket reads all partials (`sum_row`), writes the
output in its dtype and puts the counter back to zero (`store_rows` is that whole epilogue), so
the next launch (or CUDA-graph replay) finds it clean. `store_rows_gated` is the same epilogue for a
gate_up projection whose tiles hold matching gate and up rows (`gated_rows`): it stores silu(gate) *
up, so the MLP's activation needs no launch of its own at decode batches. The counters are one persistent int32
workspace per device, shared by every layer: launches on one stream never overlap where it matters
(a GEMV launched with PDL touches the counters only after waiting for the kernel before it).

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
def split_k_is_last(counters_ptr, pid_n, SPLIT_K: tl.constexpr):
    """After this program stored its partial: whether it is the tile's last (the others' partials are
    then visible to it). The last one must put the counter back to zero when done."""
    tl.debug_barrier()  # every thread's partial is written before the ticket is taken
    ticket = tl.atomic_add(counters_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    return ticket == SPLIT_K - 1


@triton.jit
def store_swapped_tile(acc, out_ptr, partials_ptr, counters_ptr, tile, offs_m, offs_n, M, N, stride_om, pid_k,
                       SPLIT_K: tl.constexpr, scale=1.0):  # fmt: skip
    """A swap-AB program's tile of y^T (acc [BLOCK_N, BLOCK_M], its K split's float32 sums; offs_n [BLOCK_N],
    offs_m [BLOCK_M]) into out [M, N] times `scale` ([BLOCK_N, 1] or 1.0): directly without a split, else
    through the partials [SPLIT_K, M, N], the tile's last program summing them in split order (the same sum
    whichever program is last) and putting its counter back to zero (ops/triton/skinny_gemm.py,
    ops/triton/w4_skinny_gemm.py)."""
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
    if SPLIT_K == 1:
        tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part_ptrs = partials_ptr + offs_m[None, :] * N + offs_n[:, None]  # split s at + s * M * N
        tl.store(part_ptrs + pid_k * M * N, acc, mask=mask)
        if split_k_is_last(counters_ptr, tile, SPLIT_K):
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part_ptrs + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, (total * scale).to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counters_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def finish_row(acc, out_ptr, partials_ptr, row, M, N, offs_n, stride_om, pid_k, SPLIT_K: tl.constexpr):
    """Store a row's [BLOCK_N] result, or its split's partial."""
    mask = offs_n < N
    if SPLIT_K == 1:
        tl.store(out_ptr + row * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partials_ptr + (pid_k * M + row) * N + offs_n, acc, mask=mask)


@triton.jit
def _partials_sum(partials_ptr, row, M, N, offs_n, SPLIT_K: tl.constexpr):
    """[BLOCK_N] float32: a row's partials at columns offs_n summed in split order (the last program)."""
    total = tl.zeros(offs_n.shape, dtype=tl.float32)
    for s in range(SPLIT_K):
        total += tl.load(
            partials_ptr + (s * M + row) * N + offs_n, mask=offs_n < N, other=0.0, cache_modifier=".cg"
        )
    return total


@triton.jit
def sum_row(out_ptr, partials_ptr, row, M, N, offs_n, stride_om, SPLIT_K: tl.constexpr):
    """The last program of a tile: a row's partials summed and stored."""
    total = _partials_sum(partials_ptr, row, M, N, offs_n, SPLIT_K)
    tl.store(out_ptr + row * stride_om + offs_n, total.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _finish_rows(acc0, acc1, acc2, acc3, out_ptr, partials_ptr, row0, M, N, offs_n, stride_om, pid_k,
                 ROWS: tl.constexpr, SPLIT_K: tl.constexpr):  # fmt: skip
    """finish_row for each of the program's ROWS rows (acc0 .. acc3: [BLOCK_N] each)."""
    finish_row(acc0, out_ptr, partials_ptr, row0, M, N, offs_n, stride_om, pid_k, SPLIT_K)
    if ROWS >= 2:
        finish_row(acc1, out_ptr, partials_ptr, row0 + 1, M, N, offs_n, stride_om, pid_k, SPLIT_K)
    if ROWS >= 4:
        finish_row(acc2, out_ptr, partials_ptr, row0 + 2, M, N, offs_n, stride_om, pid_k, SPLIT_K)
        finish_row(acc3, out_ptr, partials_ptr, row0 + 3, M, N, offs_n, stride_om, pid_k, SPLIT_K)


@triton.jit
def store_rows(
    acc0,  # [BLOCK_N] float32: row row0's result (this split's share of it)
    acc1,  # row row0 + 1 (ROWS >= 2)
    acc2,  # row row0 + 2 (ROWS == 4)
    acc3,  # row row0 + 3 (ROWS == 4)
    out_ptr,
    partials_ptr,
    counters_ptr,
    tile,  # this program's counter: one per (row group, column tile)
    row0,
    M,
    N,
    offs_n,
    stride_om,
    pid_k,
    ROWS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """A GEMV program's epilogue, shared so its kernels cannot disagree on where a row goes: rows
    row0 .. row0 + ROWS stored, or their partials stored and summed by the tile's last program."""
    _finish_rows(
        acc0, acc1, acc2, acc3, out_ptr, partials_ptr, row0, M, N, offs_n, stride_om, pid_k, ROWS, SPLIT_K
    )
    if SPLIT_K > 1:
        if split_k_is_last(counters_ptr, tile, SPLIT_K):
            for row in range(row0, row0 + ROWS):
                sum_row(out_ptr, partials_ptr, row, M, N, offs_n, stride_om, SPLIT_K)
            tl.atomic_xchg(counters_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _silu_mul_store(y, out_ptr, row, half_n, offs_v, stride_om):
    """y [BLOCK_N] float32 over a gated tile's rows (BLOCK_N / 2 gate rows, then as many up rows):
    silu(gate) * up stored at the tile's BLOCK_N / 2 output columns."""
    HALF: tl.constexpr = y.shape[0] // 2
    pair = tl.reshape(y, (2, HALF))  # [0]: gate, [1]: up
    first = (tl.arange(0, 2) == 0)[:, None]
    gate = tl.sum(tl.where(first, pair, 0.0), axis=0)
    up = tl.sum(tl.where(first, 0.0, pair), axis=0)
    cols = tl.min(offs_v, axis=0) // 2 + tl.arange(0, HALF)  # offs_v: the tile's BLOCK_N virtual columns
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_om + cols, act.to(out_ptr.dtype.element_ty), mask=cols < half_n)


@triton.jit
def store_rows_gated(
    acc0,  # [BLOCK_N] float32: row row0's gate and up sums (this split's share of them)
    acc1,
    acc2,
    acc3,
    out_ptr,  # [M, half_n]
    partials_ptr,  # [SPLIT_K, M, n_virtual] float32
    counters_ptr,
    tile,
    row0,
    M,
    half_n,  # output columns: the gate half's rows of the weight
    n_virtual,  # tiles x BLOCK_N: a gated tile's partials sit at its virtual columns
    offs_v,  # [BLOCK_N] this tile's virtual columns, pid_n * BLOCK_N + arange
    stride_om,
    pid_k,
    ROWS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """store_rows for a GEMV over a [gate; up] weight whose tiles hold BLOCK_N / 2 rows of each: every
    row of x gets silu(gate) * up, after the split's partials are summed."""
    if SPLIT_K == 1:
        _silu_mul_store(acc0, out_ptr, row0, half_n, offs_v, stride_om)
        if ROWS >= 2:
            _silu_mul_store(acc1, out_ptr, row0 + 1, half_n, offs_v, stride_om)
        if ROWS >= 4:
            _silu_mul_store(acc2, out_ptr, row0 + 2, half_n, offs_v, stride_om)
            _silu_mul_store(acc3, out_ptr, row0 + 3, half_n, offs_v, stride_om)
    else:  # partials at the tile's virtual columns (all inside n_virtual), as store_rows stores them
        _finish_rows(acc0, acc1, acc2, acc3, out_ptr, partials_ptr, row0, M, n_virtual, offs_v, stride_om, pid_k,
                     ROWS, SPLIT_K)  # fmt: skip
        if split_k_is_last(counters_ptr, tile, SPLIT_K):
            for row in range(row0, row0 + ROWS):
                total = _partials_sum(partials_ptr, row, M, n_virtual, offs_v, SPLIT_K)
                _silu_mul_store(total, out_ptr, row, half_n, offs_v, stride_om)
            tl.atomic_xchg(counters_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def store_column_tiles(
    acc0,  # [rows of K, BLOCK_N] float32: row row0's per-thread sums (the W4A16 GEMVs' accumulators)
    acc1,
    acc2,
    acc3,
    out_ptr,
    partials_ptr,
    counters_ptr,
    tile,
    row0,
    M,
    N,  # the weight's columns (gated: gate and up)
    half_n,  # gated: the output's columns
    offs_n,  # [BLOCK_N] the tile's weight columns (gated: as gated_rows gives them)
    pid_n,
    stride_om,
    pid_k,
    ROWS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GATED: tl.constexpr,
):
    """The epilogue of a GEMV that accumulates [rows of K, BLOCK_N] tiles: the sums over K, then
    store_rows, or store_rows_gated for a [gate | up] weight."""
    if GATED:
        store_rows_gated(
            tl.sum(acc0, axis=0), tl.sum(acc1, axis=0), tl.sum(acc2, axis=0), tl.sum(acc3, axis=0),
            out_ptr, partials_ptr, counters_ptr, tile, row0, M, half_n, tl.num_programs(1) * BLOCK_N,
            pid_n * BLOCK_N + tl.arange(0, BLOCK_N), stride_om, pid_k, ROWS, SPLIT_K,
        )  # fmt: skip
    else:
        store_rows(
            tl.sum(acc0, axis=0), tl.sum(acc1, axis=0), tl.sum(acc2, axis=0), tl.sum(acc3, axis=0),
            out_ptr, partials_ptr, counters_ptr, tile, row0, M, N, offs_n, stride_om, pid_k, ROWS, SPLIT_K,
        )  # fmt: skip


@triton.jit
def gated_rows(pid_n, half_n, BLOCK_N: tl.constexpr):
    """A gated tile's weight rows ([BLOCK_N]: BLOCK_N / 2 gate rows from pid_n * BLOCK_N / 2, then the
    same rows of the up half, half_n further) and which of them exist."""
    HALF: tl.constexpr = BLOCK_N // 2
    offs = tl.arange(0, BLOCK_N)
    col = pid_n * HALF + offs % HALF  # the output column each row feeds
    return col + (offs // HALF) * half_n, col < half_n


def k_splits(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(K per split, splits): K cut into `split_k` ranges of whole BLOCK_K tiles, fewer where the last
    would be empty (a split launch never has a program with no K to read)."""
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def rows_per_program(m: int) -> int:
    """Rows of x one GEMV program takes: 1 or 2 alone, 3 and more in groups of 4 (padded with zero
    rows to whole groups: the kernels mask no row)."""
    return m if m <= 2 else 4
