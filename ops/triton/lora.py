"""Batched LoRA over stacked adapter slots: one launch serves every adapter in the batch.

Both kernels take a per-token slot index (-1: no adapter). A program owns a tile of tokens (and of
the output) and loops over the slots present in its tile (between the tile's lowest and highest
index), working each time only on the rows of that slot: a prefill segment's tile is one slot, a
decode tile any mix. So every adapter of the batch goes through one launch, the grid depends on
shapes only (CUDA graphs capture it with the index as a static input; no program per slot, so 64
slots cost no more launch than one), and every output element is written by exactly one program:
no atomics anywhere.

Small batches (decode) split the shrink's input dimension over programs to stream A at full
bandwidth. Each split writes its own fp32 partial product ([split, T, K]) and the expand sums the
splits as it loads t, so nothing has to be zeroed first: a LoRA layer is exactly two launches (the
atomic version needed a memset of t before the shrink, a third launch per layer).

Ranks up to max_lora_rank are zero-padded in the stacked weights, so one launch covers them all.
A fused layer's B (q/k/v, gate/up) is block-diagonal; given where each sub-matrix's rows start, the
expand reads and multiplies only the diagonal blocks (a third of q/k/v's B, half of gate/up's).

Where these tile kernels run: the engine's LoRA layers take the segment kernels
(ops/triton/lora_segments.py: a program per run of one adapter's tokens), which load each adapter's
weights once where a tile here loads one slot after another (64 adapters in a 256-token decode step
on an H200: 4.2 ms of LoRA kernels against 19.1 ms here). These stay the separate shrink of the
one-token GEMV path (engine/lora/gemv.py, one token: one slot) and every step under
WEIR_LORA_SEGMENTS=0. Both share the row bodies below (shrink_rows, expand_rows, sub_matrices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def shrink_rows(
    x_ptr, a_slot_ptr, offs_m, m_mask, offs_k, k_mask, start, CHUNK_IN, IN, stride_xm, stride_ak,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_IN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """[BLOCK_M, BLOCK_K] fp32: rows offs_m (where m_mask) of x @ A^T over input columns
    [start, start + CHUNK_IN), A being one slot's [K, IN] at a_slot_ptr. Shared by the tile kernel
    and the segment kernels (ops/triton/lora_segments.py)."""
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for i0 in range(0, CHUNK_IN, BLOCK_IN):
        offs_i = start + i0 + tl.arange(0, BLOCK_IN)
        i_mask = offs_i < IN
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_i[None, :],
            mask=m_mask[:, None] & i_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_IN]
        a = tl.load(
            a_slot_ptr + offs_k[None, :] * stride_ak + offs_i[:, None],
            mask=k_mask[None, :] & i_mask[:, None],
            other=0.0,
        )  # [BLOCK_IN, BLOCK_K]: A^T's tile
        acc += tl.dot(x, a.to(x.dtype), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def expand_rows(
    t_ptr, b_slot_ptr, y_ptr, offs_m, m_mask, offs_n, n_mask, offs_k, k_mask, sub_lo, sub_hi,
    SLICE_K, N1, N2, OUT, SPLIT, stride_ts, stride_tm, stride_bn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """y[rows offs_m (where m_mask), cols offs_n] += (sum of t's SPLIT partials) @ B^T, B being one
    slot's [OUT, K] at b_slot_ptr, over the sub-matrices sub_lo..sub_hi this output tile meets (only
    their diagonal blocks of a fused layer's B are read). Shared by the tile and segment kernels."""
    t_mask = m_mask[:, None] & k_mask[None, :]
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for sub in range(sub_lo, sub_hi + 1):
        k = sub * SLICE_K + offs_k
        t_ptrs = t_ptr + offs_m[:, None] * stride_tm + k[None, :]
        t = tl.load(t_ptrs, mask=t_mask, other=0.0)
        for s in range(1, SPLIT):  # in split order: the sum does not depend on scheduling
            t += tl.load(t_ptrs + s * stride_ts, mask=t_mask, other=0.0)
        # this sub-matrix's rows of the tile (all of them unless the tile straddles two)
        row_lo = tl.where(sub == 0, 0, tl.where(sub == 1, N1, N2))
        row_hi = tl.where(sub == 0, N1, tl.where(sub == 1, N2, OUT))
        rows = n_mask & (offs_n >= row_lo) & (offs_n < row_hi)
        b = tl.load(
            b_slot_ptr + offs_n[None, :] * stride_bn + k[:, None],
            mask=k_mask[:, None] & rows[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]: B^T's tile
        # Round the shrink's output to B's dtype (PEFT feeds lora_A's output, in the model dtype,
        # to lora_B).
        delta += tl.dot(t.to(b.dtype), b, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=y_mask)


@triton.jit
def sub_matrices(pid_n, OUT, N1, N2, BLOCK_N: tl.constexpr):
    """The sub-matrices (0-2) an output tile meets: the first and the last (one unless it straddles a
    boundary), so the expand reads only their diagonal blocks of B (the rest is zero)."""
    n_first = pid_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, OUT) - 1
    sub_lo = (n_first >= N1).to(tl.int32) + (n_first >= N2).to(tl.int32)
    sub_hi = (n_last >= N1).to(tl.int32) + (n_last >= N2).to(tl.int32)
    return sub_lo, sub_hi


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [T, IN]
    a_ptr,  # [S, K, IN]
    slots_ptr,  # [T] int32
    out_ptr,  # [SPLIT, T, K] fp32: one partial product per split of IN (program axis 1)
    T,
    K,
    IN,
    stride_xm,
    stride_as,
    stride_ak,
    stride_os,
    stride_om,
    CHUNK_IN,  # input columns per split (a multiple of BLOCK_IN)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_IN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T
    # int64: the loop's slot multiplies a slot stride of every layer's weights (GBs at 64 slots)
    tok_slot = tl.load(slots_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
    lo = tl.min(tl.where(tok_slot >= 0, tok_slot, 1 << 30), axis=0)  # none: an empty range below
    hi = tl.max(tok_slot, axis=0)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    start = pid_split * CHUNK_IN
    out_ptrs = out_ptr + pid_split * stride_os + offs_m[:, None] * stride_om + offs_k[None, :]
    # Rows without an adapter get zeros: the buffer comes uninitialized, and this program owns its
    # rows of this split (one masked store, no separate memset launch).
    base_rows = (tok_slot < 0) & m_mask
    tl.store(
        out_ptrs, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), mask=base_rows[:, None] & k_mask[None, :]
    )
    for slot in range(lo, hi + 1):
        match = tok_slot == slot
        if tl.sum(match.to(tl.int32), axis=0) > 0:
            acc = shrink_rows(
                x_ptr, a_ptr + slot * stride_as, offs_m, match, offs_k, k_mask, start, CHUNK_IN, IN, stride_xm,
                stride_ak, BLOCK_M, BLOCK_K, BLOCK_IN, DOT_PRECISION,
            )  # fmt: skip
            tl.store(out_ptrs, acc, mask=match[:, None] & k_mask[None, :])


@triton.jit
def _lora_expand_kernel(
    t_ptr,  # [SPLIT, T, K] fp32: the shrink's partials, summed here
    b_ptr,  # [S, OUT, K]: block-diagonal over the sub-matrices of a fused layer
    slots_ptr,  # [T] int32
    y_ptr,  # [T, OUT], updated in place
    T,
    SLICE_K,  # lora_dim of one sub-matrix (K = number of sub-matrices x SLICE_K)
    N1,  # output row where sub-matrix 1 starts (OUT: there is none)
    N2,  # output row where sub-matrix 2 starts (OUT: there is none)
    OUT,
    SPLIT,
    stride_ts,
    stride_tm,
    stride_bs,
    stride_bn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_slot = tl.load(slots_ptr + offs_m, mask=offs_m < T, other=-1).to(tl.int64)  # as the shrink's
    lo = tl.min(tl.where(tok_slot >= 0, tok_slot, 1 << 30), axis=0)  # none: an empty range below
    hi = tl.max(tok_slot, axis=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < OUT
    sub_lo, sub_hi = sub_matrices(pid_n, OUT, N1, N2, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < SLICE_K
    for slot in range(lo, hi + 1):
        match = tok_slot == slot
        if tl.sum(match.to(tl.int32), axis=0) > 0:
            expand_rows(
                t_ptr, b_ptr + slot * stride_bs, y_ptr, offs_m, match, offs_n, n_mask, offs_k, k_mask, sub_lo,
                sub_hi, SLICE_K, N1, N2, OUT, SPLIT, stride_ts, stride_tm, stride_bn, stride_ym, BLOCK_M,
                BLOCK_N, DOT_PRECISION,
            )  # fmt: skip


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 models are the parity runs: TF32 (tl.dot's default for fp32 on CUDA) would round inputs to
    # 10 mantissa bits and flip greedy tokens against PEFT; 16-bit inputs are exact either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _block_m(num_tokens: int, block_k: int) -> int:
    """Token tile: 64 for long batches (each slot's weight tile is reused over more tokens), 16 for
    decode-sized ones and wide ranks (a [64, block_k] fp32 tile would spill registers)."""
    return 64 if num_tokens >= 256 and block_k <= 64 else 16


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    a_stacked: torch.Tensor,  # [num_slots, lora_dim, in_features]
    token_slots: torch.Tensor,  # [num_tokens] int32; -1 = no adapter
    chunk: int = 512,
) -> torch.Tensor:
    """x @ A[slot]^T per token as partial products over splits of in_features -> [split, num_tokens,
    lora_dim] float32, whose sum over dim 0 is ops.reference.lora_shrink's [num_tokens, lora_dim] (rows
    of slot -1 are zeros). `lora_expand` takes it as it is and sums the splits as it loads them.
    `chunk`: input columns per split at small batches (rounded up to a multiple of 64; at most 64
    programs in all, so fewer splits where that would be more)."""
    num_tokens, in_features = x.shape
    num_slots, lora_dim, a_in = a_stacked.shape
    if a_in != in_features or token_slots.shape[0] != num_tokens:
        raise ValueError(
            f"lora_shrink: x {tuple(x.shape)}, A {tuple(a_stacked.shape)}, slots {tuple(token_slots.shape)}"
        )
    x = x.contiguous()
    if num_tokens == 0:
        return torch.zeros(1, 0, lora_dim, dtype=torch.float32, device=x.device)
    block_k = _block_k(lora_dim)
    block_m, block_in = _block_m(num_tokens, block_k), 64
    num_m = triton.cdiv(num_tokens, block_m)
    # Small batches (decode) give too few programs to stream A at full bandwidth: split the input
    # dimension too, one partial product per split. Fixed by shapes only, so graphs capture it.
    if chunk <= 0:
        raise ValueError(f"lora_shrink: chunk {chunk} is not positive")
    split = max(1, min(in_features // chunk, 64 // num_m))
    chunk = triton.cdiv(triton.cdiv(in_features, split), block_in) * block_in
    split = triton.cdiv(in_features, chunk)
    # Every element is written by the kernel (partials, or zeros on rows without an adapter): no memset.
    out = torch.empty(split, num_tokens, lora_dim, dtype=torch.float32, device=x.device)
    del num_slots  # the kernel reads the slots of its tile from token_slots
    _lora_shrink_kernel[(num_m, split)](
        x,
        a_stacked,
        token_slots,
        out,
        num_tokens,
        lora_dim,
        in_features,
        x.stride(0),
        a_stacked.stride(0),
        a_stacked.stride(1),
        out.stride(0),
        out.stride(1),
        chunk,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_IN=block_in,
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return out


def lora_expand(
    t: torch.Tensor,  # [split, num_tokens, lora_dim] float32 (lora_shrink's partials) or [num_tokens, lora_dim]
    b_stacked: torch.Tensor,  # [num_slots, out_features, lora_dim]
    token_slots: torch.Tensor,  # [num_tokens] int32; -1 = no adapter
    y: torch.Tensor,  # [num_tokens, out_features], updated in place
    slice_offsets: Sequence[int] = (0,),  # output row where each sub-matrix of a fused layer starts
) -> torch.Tensor:
    """y += (sum of t's splits) @ B[slot]^T per token, in place; returns y (ops.reference.lora_expand).

    A fused layer's B is block-diagonal: sub-matrix i's rows (from slice_offsets[i]) read only
    columns [i * lora_dim / n, (i + 1) * lora_dim / n). Each output tile reads only the column blocks
    of the sub-matrices it meets, so the zeros (2/3 of a q/k/v B, 1/2 of gate/up's) are not read."""
    shape = tuple(t.shape)
    t = (t.unsqueeze(0) if t.dim() == 2 else t).contiguous()  # a 2-D t is one split
    split, num_tokens, lora_dim = t.shape
    num_slots, out_features, b_k = b_stacked.shape
    if b_k != lora_dim or y.shape != (num_tokens, out_features) or token_slots.shape[0] != num_tokens:
        raise ValueError(
            f"lora_expand: t {shape}, B {tuple(b_stacked.shape)}, y {tuple(y.shape)}, "
            f"slots {tuple(token_slots.shape)}"
        )
    num_subs = len(slice_offsets)
    if not 1 <= num_subs <= 3 or lora_dim % num_subs or slice_offsets[0] != 0:
        raise ValueError(f"lora_expand: slice_offsets {tuple(slice_offsets)} for lora_dim {lora_dim}")
    if num_tokens == 0:
        return y
    if y.stride(1) != 1:
        raise ValueError("lora_expand: y must be contiguous along its last dimension")
    slice_k = lora_dim // num_subs
    bounds = [*slice_offsets[1:], out_features, out_features][:2]  # N1, N2
    block_k = _block_k(slice_k)
    block_m, block_n = _block_m(num_tokens, block_k), 64
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, block_n))
    _lora_expand_kernel[grid](
        t,
        b_stacked,
        token_slots,
        y,
        num_tokens,
        slice_k,
        bounds[0],
        bounds[1],
        out_features,
        split,
        t.stride(0),
        t.stride(1),
        b_stacked.stride(0),
        b_stacked.stride(1),
        y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(b_stacked.dtype),
    )
    return y
