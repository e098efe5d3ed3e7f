"""One token through a LoRA layer in one GEMV launch: y = x W^T (+ x A[slot]^T B[slot]^T).

At batch 1 a LoRA layer was three launches: the base GEMV, the shrink (t = x A^T) and the expand
(y += t B^T), each a few microseconds of ramp and drain around a few kilobytes of LoRA weights (A3:
an adapter made batch-1 decode 1.31x slower on an H200, 256 LoRA launches a step on Llama-3-8B).
Here the float GEMV of ops/triton/fp8_gemv.py (same tiles, same split-K epilogue) adds the expand
term to its output columns before it stores them:

    y[n] += sum_{r < R} t[s_n R + r] * B[slot, n, s_n R + r]

s_n being n's sub-matrix (fused q/k/v or gate/up: B is block-diagonal, so each output column reads
only its own block's R columns: a program reads B's rows of its own columns, nothing else). t is the
shrink's fp32 partials ([split, 1, lora_dim], summed here as they are loaded) rounded to B's dtype, as
ops.triton.lora's expand does (PEFT feeds lora_A's output, in the model dtype, to lora_B); slot is
the token's adapter slot, -1 adding nothing. With split-K only the K-split 0 adds the term (the tile's
last program sums the splits). `gemv_lora_expand` takes t from `lora_shrink`: two launches a layer.

`gemv_lora` also computes t in the same launch: one launch a layer. The grid has extra programs, and
roles go by tickets drawn from an atomic counter, not by program ids: the first `workers` tickets
compute disjoint input ranges of x A[slot]^T (each its own partial, as the shrink's splits) and
publish them with a release increment of a ready counter; the other tickets are GEMV programs, which
stream their weights first and only then acquire-poll the ready counter before the epilogue. A GEMV
program waits only after it drew its ticket, so every worker had drawn one before it: the workers
are running (or done), and they wait on nothing, so the wait ends (program ids would give no such
guarantee: a waiting GEMV program could occupy the slot a worker never got). Under TRITON_INTERPRET
programs run one after another in grid order and draw tickets in that order: the workers run first.
The last program to finish (a third counter) puts the three counters back to zero, so the next
launch, or graph replay, finds them clean. No PDL there: a ticket drawn before the previous kernel
finished could be that kernel's.

Launch options, off by default (the defaults are the launches measured so far, bit for bit), for
loadtest/sweep_lora_gemv.py to measure; they shorten the two latency chains the LoRA term still adds
(H200 at e33bbfa: 5-9 us a layer over the base GEMV):
- `shrink_chunk` (gemv_lora): input columns per worker, a multiple of SHRINK_BLOCK_K (default
  SHRINK_CHUNK, lora_shrink's split at one token): a worker walks its chunk in SHRINK_BLOCK_K-wide
  tiles, one dependent load after another, so a smaller chunk is a shorter chain, and more workers and
  partials. (lora_shrink's own `chunk` is the same knob for the two-launch path.)
- `reduce_t` (gemv_lora): the last worker to publish (a ticket on the ready counter, which it reads
  with acquire: every partial is visible to it) sums the partials in split order into one more row of t
  and publishes again; the GEMV programs wait for T_SPLIT + 1 and their epilogue loads that one row
  instead of T_SPLIT. Same float32 sums in the same order as the epilogue's: the same bits.
- `early_b` (both): the epilogue's B rows and the slot are loaded before the K loop (after the PDL wait),
  so their latency hides under the weight stream; a [BLOCK_N, BLOCK_R] tile, a few registers a thread.
  The same bits too. Not measured yet: no plan uses them.

Launched only for one token of an unquantized layer inside CUDA graphs (engine.lora.layers); the
spec is F.linear + ops.reference's shrink and expand (tests/ops/test_lora_gemv.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ops.triton.fp8_gemv import _w_tile
from ops.triton.pdl import pdl_enabled, wait_for_previous_kernel
from ops.triton.split_k import MAX_TILES, k_splits, split_counters, store_rows

SHRINK_CHUNK = 512  # input columns per shrink worker (lora_shrink's split at one token)
# A worker's tile of A along K, [lora_dim, 32]: narrow, so that the worker's branch needs few more
# registers than the GEMV's (sm_90 build of 8 x 512 GEMV tiles: 119 a thread vs 94; 64 wide: 149)
SHRINK_BLOCK_K = 32

_sync: dict[torch.device, torch.Tensor] = {}


def _sync_counters(device: torch.device) -> torch.Tensor:
    """[3] int32 zeros per device (ticket, ready, done), made on first use: an eager call (the warm-up
    before graph capture), so they never live in a graph's memory pool. Every `gemv_lora` launch
    shares them: launches on one stream run one after another, and each leaves them at zero."""
    counters = _sync.get(device)
    if counters is None:
        counters = torch.zeros(3, dtype=torch.int32, device=device)
        _sync[device] = counters
    return counters


@triton.jit
def _expand_cols(offs_n, mask_n, N1, N2, RANK, BLOCK_R: tl.constexpr):
    """[BLOCK_N, BLOCK_R] columns of t and B that each output column reads (its own sub-matrix's
    block of B), and their mask."""
    sub = (offs_n >= N1).to(tl.int32) + (offs_n >= N2).to(tl.int32)  # [BLOCK_N]
    offs_r = tl.arange(0, BLOCK_R)
    cols = sub[:, None] * RANK + offs_r[None, :]  # [BLOCK_N, BLOCK_R]
    mask = mask_n[:, None] & (offs_r < RANK)[None, :]
    return cols, mask


@triton.jit
def _sum_t(t_ptr, cols, mask, T_ROWS, stride_ts):
    """[BLOCK_N, BLOCK_R] float32: t's first T_ROWS partials at `cols`, summed in split order (as the
    expand kernel sums them). Past L1: in `gemv_lora` other programs of this launch wrote t."""
    t = tl.load(t_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, T_ROWS):
        t += tl.load(t_ptr + s * stride_ts + cols, mask=mask, other=0.0, cache_modifier=".cg")
    return t


@triton.jit
def _expand_term(
    t_ptr,  # [T_ROWS, 1, LORA_DIM] float32
    b_ptr,  # [S, N, LORA_DIM], at this token's slot
    offs_n,  # [BLOCK_N] this program's output columns
    mask_n,
    N1,  # first column of sub-matrix 1 (N: none)
    N2,  # first column of sub-matrix 2 (N: none)
    RANK,  # columns of t (and of B) per sub-matrix
    T_ROWS,
    stride_ts,
    stride_bn,
    BLOCK_R: tl.constexpr,
):
    """[BLOCK_N] float32: each column's LoRA term, from its own sub-matrix's block of B."""
    cols, mask = _expand_cols(offs_n, mask_n, N1, N2, RANK, BLOCK_R)
    t = _sum_t(t_ptr, cols, mask, T_ROWS, stride_ts)
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + cols, mask=mask, other=0.0)  # [BLOCK_N, BLOCK_R]
    return tl.sum(t.to(b.dtype).to(tl.float32) * b.to(tl.float32), axis=1)


@triton.jit
def _reduce_t(
    t_ptr,  # [T_SPLIT + 1, 1, LORA_DIM] float32: the partials, then their sum
    T_SPLIT,
    LORA_DIM,
    stride_ts,
    BLOCK_D: tl.constexpr,
):
    """Row T_SPLIT of t = the sum of rows 0 .. T_SPLIT - 1, in split order (the epilogue's own order:
    the same float32 sums, whichever worker does it)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < LORA_DIM
    t = tl.load(t_ptr + offs_d, mask=mask_d, other=0.0, cache_modifier=".cg")  # [BLOCK_D]
    for s in range(1, T_SPLIT):
        t += tl.load(t_ptr + s * stride_ts + offs_d, mask=mask_d, other=0.0, cache_modifier=".cg")
    tl.store(t_ptr + T_SPLIT * stride_ts + offs_d, t, mask=mask_d)


@triton.jit
def _shrink_part(
    x_ptr,  # [1, K]
    a_ptr,  # [LORA_DIM, K], at this token's slot
    t_ptr,  # [T_SPLIT, 1, LORA_DIM] float32
    part,  # which input range (and partial) this worker computes
    K,
    LORA_DIM,
    CHUNK,  # input columns per part (a multiple of BLOCK_K)
    stride_ak,
    stride_ts,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Partial `part` of x A^T over inputs [part * CHUNK, (part + 1) * CHUNK), stored in t."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < LORA_DIM
    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    for k0 in range(part * CHUNK, part * CHUNK + CHUNK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0)  # [BLOCK_K]
        a = tl.load(
            a_ptr + offs_d[:, None] * stride_ak + offs_k[None, :],
            mask=mask_d[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_K]: rows of A, contiguous along K
        # x in A's dtype, as the shrink kernel's dot takes them; products summed in float32
        acc += a.to(tl.float32) * x.to(a.dtype).to(tl.float32)[None, :]
    tl.store(t_ptr + part * stride_ts + offs_d, tl.sum(acc, axis=1), mask=mask_d)


@triton.jit
def _gemv_part(
    pid_n,  # this program's column tile
    pid_k,  # and K-split
    x_ptr, w_ptr, scale_ptr, out_ptr, partials_ptr, counters_ptr, t_ptr, b_ptr, slots_ptr, sync_ptr,
    N, K, k_per_split, stride_wn, stride_bs, stride_bn, stride_ts, N1, N2, RANK, T_SPLIT,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr, BLOCK_R: tl.constexpr, FUSE_SHRINK: tl.constexpr, REDUCE_T: tl.constexpr,
    EARLY_B: tl.constexpr,
):  # fmt: skip
    """fp8_gemv's program at one token (ROWS 1), the LoRA term added to its columns before they are stored."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K] at K = 0
    k_last = k_start + (k_end - 1 - k_start) // BLOCK_K * BLOCK_K  # the split's last tile
    if PREFETCH:
        w = _w_tile(w_ptrs, k_start, k_end, mask_n, BLOCK_K)
    wait_for_previous_kernel(PDL)  # x, the slot, t and every write come after it (ops.triton.pdl)
    if EARLY_B:  # B's rows do not depend on the shrink: their latency hides under the weight stream
        slot = tl.load(slots_ptr)
        cols, mask_t = _expand_cols(offs_n, mask_n, N1, N2, RANK, BLOCK_R)
        # only where the epilogue will use them; as a [BLOCK_N] predicate (the interpreter takes no
        # scalar in a block's mask)
        use_b = (offs_n * 0 + slot >= 0) & (offs_n * 0 + pid_k == 0)  # [BLOCK_N]
        b = tl.load(
            b_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + cols,
            mask=mask_t & use_b[:, None],
            other=0.0,
        )  # [BLOCK_N, BLOCK_R]: a few registers a thread, held through the K loop
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        if PREFETCH:
            w_next = _w_tile(w_ptrs, tl.minimum(k0 + BLOCK_K, k_last), k_end, mask_n, BLOCK_K)
        else:
            w = _w_tile(w_ptrs, k0, k_end, mask_n, BLOCK_K)
        acc += w * tl.load(x_ptr + kk, mask=kk < k_end, other=0.0).to(tl.float32)[None, :]
        if PREFETCH:
            w = w_next
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]
    if not EARLY_B:
        slot = tl.load(slots_ptr)
    if (pid_k == 0) & (slot >= 0):  # one K-split adds the term
        if REDUCE_T:  # one row: the last worker's sum of the partials (row T_SPLIT), published after them
            t_rows_ptr = t_ptr + T_SPLIT * stride_ts
            t_rows = 1
            ready_at = T_SPLIT + 1
        else:
            t_rows_ptr = t_ptr
            t_rows = T_SPLIT
            ready_at = T_SPLIT
        if FUSE_SHRINK:  # the weights are streamed: now wait for the workers' partials
            while tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu") < ready_at:
                pass
            tl.debug_barrier()
        if EARLY_B:
            t = _sum_t(t_rows_ptr, cols, mask_t, t_rows, stride_ts)
            y += tl.sum(t.to(b.dtype).to(tl.float32) * b.to(tl.float32), axis=1)
        else:
            y += _expand_term(
                t_rows_ptr,
                b_ptr + slot.to(tl.int64) * stride_bs,
                offs_n,
                mask_n,
                N1,
                N2,
                RANK,
                t_rows,
                stride_ts,
                stride_bn,
                BLOCK_R,
            )
    store_rows(
        y, y, y, y, out_ptr, partials_ptr, counters_ptr, pid_n, 0, 1, N, offs_n, 0, pid_k, 1, SPLIT_K,
    )  # fmt: skip


@triton.jit
def _gemv_lora_kernel(
    x_ptr,  # [1, K]
    w_ptr,  # [N, K]
    scale_ptr,  # [N] float32
    out_ptr,  # [1, N]
    partials_ptr,  # [SPLIT_K, 1, N] float32 (split-K)
    counters_ptr,  # split-K counters (ops.triton.split_k)
    a_ptr,  # [S, LORA_DIM, K] (FUSE_SHRINK)
    t_ptr,  # [T_SPLIT (+ 1: REDUCE_T), 1, LORA_DIM] float32: the shrink's partials (written here when FUSE_SHRINK)
    b_ptr,  # [S, N, LORA_DIM]
    slots_ptr,  # [>= 1] int32: slots_ptr[0] is the token's slot
    sync_ptr,  # [3] int32: ticket, ready, done (FUSE_SHRINK)
    N,
    K,
    k_per_split,
    stride_wn,
    stride_as,
    stride_ak,
    stride_bs,
    stride_bn,
    stride_ts,
    N1,  # first column of sub-matrix 1 (N: none)
    N2,  # first column of sub-matrix 2 (N: none)
    RANK,  # lora_dim of one sub-matrix
    LORA_DIM,
    T_SPLIT,  # partials of t (FUSE_SHRINK: also the number of worker tickets, one partial each)
    CHUNK,  # input columns per worker (FUSE_SHRINK)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SHRINK_BLOCK: tl.constexpr,  # a worker's tile of A along K
    FUSE_SHRINK: tl.constexpr,
    REDUCE_T: tl.constexpr,  # FUSE_SHRINK: the last worker sums the partials into row T_SPLIT of t
    EARLY_B: tl.constexpr,  # the epilogue's B rows (and the slot) loaded before the K loop
):
    if FUSE_SHRINK:
        role = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")  # a ticket, not the program id
        if role < T_SPLIT:  # a shrink worker
            slot = tl.load(slots_ptr)
            if slot >= 0:
                _shrink_part(
                    x_ptr, a_ptr + slot.to(tl.int64) * stride_as, t_ptr, role, K, LORA_DIM, CHUNK, stride_ak, stride_ts,
                    BLOCK_D, SHRINK_BLOCK,
                )  # fmt: skip
            tl.debug_barrier()  # every thread's partial stored before it is published
            if REDUCE_T:
                # a ticket on the ready counter: the last worker to publish (acquiring every other
                # worker's release) sums the partials, then publishes once more (ready = T_SPLIT + 1)
                if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == T_SPLIT - 1:
                    tl.debug_barrier()
                    if slot >= 0:
                        _reduce_t(t_ptr, T_SPLIT, LORA_DIM, stride_ts, BLOCK_D)
                    tl.debug_barrier()
                    tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
            else:
                tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
        else:
            tiles = tl.cdiv(N, BLOCK_N)
            _gemv_part(
                (role - T_SPLIT) % tiles, (role - T_SPLIT) // tiles, x_ptr, w_ptr, scale_ptr, out_ptr, partials_ptr, counters_ptr, t_ptr, b_ptr,
                slots_ptr, sync_ptr, N, K, k_per_split, stride_wn, stride_bs, stride_bn, stride_ts, N1, N2,
                RANK, T_SPLIT, BLOCK_N, BLOCK_K, SPLIT_K, PREFETCH, PDL, BLOCK_R, FUSE_SHRINK, REDUCE_T, EARLY_B,
            )  # fmt: skip
        # the last program out puts the counters back for the next launch
        total = T_SPLIT + tl.cdiv(N, BLOCK_N) * SPLIT_K
        if tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel", scope="gpu") == total - 1:
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(sync_ptr + 2, 0, sem="relaxed", scope="gpu")
    else:
        _gemv_part(
            tl.program_id(0), tl.program_id(1), x_ptr, w_ptr, scale_ptr, out_ptr, partials_ptr, counters_ptr, t_ptr, b_ptr,
            slots_ptr, sync_ptr, N, K, k_per_split, stride_wn, stride_bs, stride_bn, stride_ts, N1, N2,
            RANK, T_SPLIT, BLOCK_N, BLOCK_K, SPLIT_K, PREFETCH, PDL, BLOCK_R, FUSE_SHRINK, False, EARLY_B,
        )  # fmt: skip


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    b_stacked: torch.Tensor,
    offsets: Sequence[int],
) -> None:
    n, k = weight.shape
    if x.shape != (1, k) or weight_scale.shape != (n,) or b_stacked.shape[1] != n:
        raise ValueError(
            f"gemv_lora: x {tuple(x.shape)} (one token), weight {tuple(weight.shape)}, "
            f"scale {tuple(weight_scale.shape)}, B {tuple(b_stacked.shape)}"
        )
    lora_dim = b_stacked.shape[2]
    if not 1 <= len(offsets) <= 3 or lora_dim % len(offsets) or offsets[0] != 0:
        raise ValueError(f"gemv_lora: slice_offsets {tuple(offsets)} for lora_dim {lora_dim}")
    if weight.stride(1) != 1 or x.stride(1) != 1 or b_stacked.stride(2) != 1:
        raise ValueError("gemv_lora: weight, x and B must be contiguous along their last dimension")


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    a_stacked: torch.Tensor | None,
    t: torch.Tensor | None,
    b_stacked: torch.Tensor,
    token_slots: torch.Tensor,
    slice_offsets: Sequence[int],
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
    prefetch: bool,
    shrink_chunk: int = SHRINK_CHUNK,
    reduce_t: bool = False,
    early_b: bool = False,
) -> torch.Tensor:
    _check(x, weight, weight_scale, b_stacked, slice_offsets)
    n, k = weight.shape
    lora_dim = b_stacked.shape[2]
    k_per_split, split_k = k_splits(k, split_k, block_k)
    tiles = triton.cdiv(n, block_n)
    if split_k > 1 and tiles > MAX_TILES:
        raise ValueError(f"gemv_lora: {tiles} tiles exceed the split-K workspace ({MAX_TILES})")
    fuse = t is None
    if fuse:  # the workers' partials, each written by its worker whatever the slot (never read at -1)
        assert a_stacked is not None
        if a_stacked.shape[1:] != (lora_dim, k) or a_stacked.stride(2) != 1:
            raise ValueError(f"gemv_lora: A {tuple(a_stacked.shape)} for lora_dim {lora_dim}, K {k}")
        if shrink_chunk <= 0 or shrink_chunk % SHRINK_BLOCK_K:
            raise ValueError(
                f"gemv_lora: shrink_chunk {shrink_chunk} is not a positive multiple of {SHRINK_BLOCK_K}"
            )
        t_split = triton.cdiv(k, shrink_chunk)
        # reduce_t: one row more, the partials' sum (written by the last worker)
        t = torch.empty(t_split + int(reduce_t), 1, lora_dim, dtype=torch.float32, device=x.device)
        a = a_stacked
    else:
        t = t.unsqueeze(0) if t.dim() == 2 else t  # [split, 1, lora_dim]
        if t.shape[1:] != (1, lora_dim) or t.stride(2) != 1:
            raise ValueError(f"gemv_lora: t {tuple(t.shape)} for one token, lora_dim {lora_dim}")
        t_split = t.shape[0]
        a = b_stacked  # not read
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    partials = torch.empty(split_k, 1, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    sync = _sync_counters(x.device) if fuse else token_slots
    pdl = prefetch and not fuse and pdl_enabled(x.device)
    bounds = [*slice_offsets[1:], n, n][:2]
    rank = lora_dim // len(slice_offsets)
    grid = (tiles * split_k + t_split,) if fuse else (tiles, split_k)  # fused: roles go by ticket
    _gemv_lora_kernel[grid](
        x, weight, weight_scale, out, partials, split_counters(x.device), a, t, b_stacked, token_slots, sync,
        n, k, k_per_split, weight.stride(0), a.stride(0), a.stride(1), b_stacked.stride(0), b_stacked.stride(1),
        t.stride(0), bounds[0], bounds[1], rank, lora_dim, t_split, shrink_chunk,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, PREFETCH=prefetch, PDL=pdl,
        BLOCK_R=triton.next_power_of_2(rank), BLOCK_D=triton.next_power_of_2(lora_dim), SHRINK_BLOCK=SHRINK_BLOCK_K,
        FUSE_SHRINK=fuse, REDUCE_T=fuse and reduce_t, EARLY_B=early_b,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return out


def gemv_lora_expand(
    x: torch.Tensor,  # [1, K]: one token
    weight: torch.Tensor,  # [N, K], any float dtype
    weight_scale: torch.Tensor,  # [N] float32 (ones for a float weight)
    t: torch.Tensor,  # [split, 1, lora_dim] float32: lora_shrink's partials (or [1, lora_dim])
    b_stacked: torch.Tensor,  # [num_slots, N, lora_dim]: scaling folded in, block-diagonal when fused
    token_slots: torch.Tensor,  # [>= 1] int32: element 0 is the token's slot; -1 = no adapter
    slice_offsets: Sequence[int] = (0,),  # the column where each sub-matrix starts
    block_n: int = 16,
    block_k: int = 256,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    prefetch: bool = False,
    early_b: bool = False,
) -> torch.Tensor:  # [1, N] in x.dtype
    """x (weight * scale)^T + (sum of t's splits) B[slot]^T in one launch: the base GEMV with the
    expand as its epilogue (ops.reference.lora_expand applied to F.linear's output, but the term is
    added in float32 before the output is rounded once). `early_b`: B's rows are loaded before the
    K loop (module docstring)."""
    return _launch(
        x, weight, weight_scale, None, t, b_stacked, token_slots, slice_offsets, block_n, block_k, split_k,
        num_warps, num_stages, prefetch, early_b=early_b,
    )  # fmt: skip


def gemv_lora(
    x: torch.Tensor,  # [1, K]: one token
    weight: torch.Tensor,  # [N, K]
    weight_scale: torch.Tensor,  # [N] float32
    a_stacked: torch.Tensor,  # [num_slots, lora_dim, K]
    b_stacked: torch.Tensor,  # [num_slots, N, lora_dim]
    token_slots: torch.Tensor,  # [>= 1] int32: element 0 is the token's slot; -1 = no adapter
    slice_offsets: Sequence[int] = (0,),
    block_n: int = 16,
    block_k: int = 256,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    prefetch: bool = False,
    shrink_chunk: int = SHRINK_CHUNK,
    reduce_t: bool = False,
    early_b: bool = False,
) -> torch.Tensor:  # [1, N] in x.dtype
    """The whole LoRA layer at one token in one launch: shrink workers and the GEMV with the expand
    epilogue, synchronized by tickets (module docstring). PDL is off for it. `shrink_chunk` (input
    columns per worker, a multiple of SHRINK_BLOCK_K), `reduce_t` and `early_b`: module docstring."""
    return _launch(
        x, weight, weight_scale, a_stacked, None, b_stacked, token_slots, slice_offsets, block_n, block_k,
        split_k, num_warps, num_stages, prefetch, shrink_chunk, reduce_t, early_b,
    )  # fmt: skip
