"""Batched LoRA by segments: one program per run of tokens on one adapter (engine/lora/segments.py
builds the runs on the host each step), not one per tile of tokens looping over the slots in it.

ops/triton/lora.py's tile kernels suit batches of few adapters (a prefill segment fills a tile). With
many adapters in a decode step a tile holds many slots, and each program loaded one slot's weights
after another: with 64 adapters in a 256-token step on an H200 they took 19 ms of a 31 ms step. Here
a program takes a segment (grid-stride over the segments, whose count the kernel reads from the
device array, so a CUDA graph captures a grid that fits every step of its size) and loads its
adapter's weights once:
- shrink: programs (segment, split of the input dimension) write fp32 partials [split, T, lora_dim]
  for their segment's rows; rows without an adapter are left unwritten (the expand never reads them);
- expand: programs (output tile, segment) add the segment's rows of (sum of the splits) @ B[slot]^T
  into y, reading only the diagonal blocks of a fused layer's B, as the tile kernel does.
Each output element belongs to one segment: no atomics. The spec is ops.reference.lora_shrink /
lora_expand (tests/ops/test_lora_segments.py, under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ops.triton.lora import _block_k, _dot_precision, expand_rows, shrink_rows, sub_matrices

SEGMENT_PROGRAMS = 64  # programs along the segment axis (grid-stride beyond): 64 adapters, one each
BLOCK_IN = 64


@triton.jit
def _segment(seg_ptr, seg):
    """(first token, end token, slot as int64: it multiplies a slot stride of GBs at 64 slots)."""
    first = tl.load(seg_ptr + 1 + 3 * seg)
    end = tl.load(seg_ptr + 2 + 3 * seg)
    slot = tl.load(seg_ptr + 3 + 3 * seg).to(tl.int64)
    return first, end, slot


@triton.jit
def _segment_shrink_kernel(
    x_ptr,  # [T, IN]
    a_ptr,  # [S, K, IN]
    seg_ptr,  # [1 + 3 * segments] int32 (engine.lora.segments)
    out_ptr,  # [SPLIT, T, K] fp32
    T,  # this forward's tokens: segment rows past it (a stale table) are never touched
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
    pid = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_segments = tl.load(seg_ptr)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    start = pid_split * CHUNK_IN
    for seg in range(pid, num_segments, tl.num_programs(0)):
        first, end, slot = _segment(seg_ptr, seg)
        for m0 in range(first, end, BLOCK_M):  # one pass unless a piece is longer than BLOCK_M
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = (offs_m < end) & (offs_m < T)
            acc = shrink_rows(
                x_ptr, a_ptr + slot * stride_as, offs_m, m_mask, offs_k, k_mask, start, CHUNK_IN, IN, stride_xm,
                stride_ak, BLOCK_M, BLOCK_K, BLOCK_IN, DOT_PRECISION,
            )  # fmt: skip
            out_ptrs = out_ptr + pid_split * stride_os + offs_m[:, None] * stride_om + offs_k[None, :]
            tl.store(out_ptrs, acc, mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def _segment_expand_kernel(
    t_ptr,  # [SPLIT, T, K] fp32: the shrink's partials, summed here
    b_ptr,  # [S, OUT, K]: block-diagonal over the sub-matrices of a fused layer
    seg_ptr,  # [1 + 3 * segments] int32
    y_ptr,  # [T, OUT], updated in place
    T,  # as the shrink's
    SLICE_K,  # lora_dim of one sub-matrix
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
    pid_n = tl.program_id(0)
    pid = tl.program_id(1)
    num_segments = tl.load(seg_ptr)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < OUT
    sub_lo, sub_hi = sub_matrices(pid_n, OUT, N1, N2, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < SLICE_K
    for seg in range(pid, num_segments, tl.num_programs(1)):
        first, end, slot = _segment(seg_ptr, seg)
        for m0 in range(first, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            expand_rows(
                t_ptr, b_ptr + slot * stride_bs, y_ptr, offs_m, (offs_m < end) & (offs_m < T), offs_n, n_mask, offs_k, k_mask,
                sub_lo, sub_hi, SLICE_K, N1, N2, OUT, SPLIT, stride_ts, stride_tm, stride_bn, stride_ym, BLOCK_M,
                BLOCK_N, DOT_PRECISION,
            )  # fmt: skip


def _segment_programs(num_tokens: int, programs: int | None) -> int:
    """Programs along the segment axis: at most one a token (there are no more segments)."""
    return max(1, min(num_tokens, programs or SEGMENT_PROGRAMS))


def _block_m(rows: int, block_k: int) -> int:
    """Rows per pass: the segments' most tokens (16 or 64, engine.lora.segments.segment_piece), so a
    piece is one pass and reads its adapter's weights once; 16 for wide ranks (the fp32 tile)."""
    return 16 if block_k > 64 else max(16, min(64, triton.next_power_of_2(rows)))


def lora_shrink_segments(
    x: torch.Tensor,  # [num_tokens, in_features]
    a_stacked: torch.Tensor,  # [num_slots, lora_dim, in_features]
    segments: torch.Tensor,  # [>= 1 + 3 * segments] int32 on x's device (engine.lora.segments)
    piece: int = 16,  # the segments' most tokens (engine.lora.segments.segment_piece)
    chunk: int = 512,
    programs: int | None = None,  # along the segment axis (default SEGMENT_PROGRAMS)
    total_programs: int = 512,  # the input dimension splits until segments x splits reach this
    num_warps: int = 4,
) -> torch.Tensor:
    """x @ A[slot]^T for every segment's rows -> [split, num_tokens, lora_dim] float32 partials whose sum
    over dim 0 is ops.reference.lora_shrink on those rows; rows in no segment are left unwritten."""
    num_tokens, in_features = x.shape
    _, lora_dim, a_in = a_stacked.shape
    if a_in != in_features:
        raise ValueError(f"lora_shrink_segments: x {tuple(x.shape)}, A {tuple(a_stacked.shape)}")
    if chunk <= 0:
        raise ValueError(f"lora_shrink_segments: chunk {chunk} is not positive")
    x = x.contiguous()
    if num_tokens == 0:
        return torch.zeros(1, 0, lora_dim, dtype=torch.float32, device=x.device)
    block_k = _block_k(lora_dim)
    programs = _segment_programs(num_tokens, programs)
    # Split the input dimension so that segments x splits fill the GPU (~512 programs): a segment's
    # A is then streamed by several programs at once. Fixed by shapes only, so graphs capture it.
    split = max(1, min(in_features // chunk, total_programs // programs))
    chunk = triton.cdiv(triton.cdiv(in_features, split), BLOCK_IN) * BLOCK_IN
    split = triton.cdiv(in_features, chunk)
    out = torch.empty(split, num_tokens, lora_dim, dtype=torch.float32, device=x.device)
    _segment_shrink_kernel[(programs, split)](
        x, a_stacked, segments, out, num_tokens, lora_dim, in_features,
        x.stride(0), a_stacked.stride(0), a_stacked.stride(1), out.stride(0), out.stride(1), chunk,
        BLOCK_M=_block_m(piece, block_k), BLOCK_K=block_k, BLOCK_IN=BLOCK_IN, DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=num_warps,
    )  # fmt: skip
    return out


def lora_expand_segments(
    t: torch.Tensor,  # [split, num_tokens, lora_dim] float32 (lora_shrink_segments' partials)
    b_stacked: torch.Tensor,  # [num_slots, out_features, lora_dim]
    segments: torch.Tensor,  # [>= 1 + 3 * segments] int32 (engine.lora.segments)
    y: torch.Tensor,  # [num_tokens, out_features], updated in place
    slice_offsets: Sequence[int] = (0,),  # output row where each sub-matrix of a fused layer starts
    piece: int = 16,
    block_n: int = 128,  # output columns per program
    programs: int | None = None,  # along the segment axis (default SEGMENT_PROGRAMS)
    num_warps: int = 4,
) -> torch.Tensor:
    """y += (sum of t's splits) @ B[slot]^T on every segment's rows, in place; returns y (rows in no
    segment untouched): ops.reference.lora_expand."""
    t = (t.unsqueeze(0) if t.dim() == 2 else t).contiguous()
    split, num_tokens, lora_dim = t.shape
    _, out_features, b_k = b_stacked.shape
    if b_k != lora_dim or y.shape != (num_tokens, out_features):
        raise ValueError(
            f"lora_expand_segments: t {tuple(t.shape)}, B {tuple(b_stacked.shape)}, y {tuple(y.shape)}"
        )
    num_subs = len(slice_offsets)
    if not 1 <= num_subs <= 3 or lora_dim % num_subs or slice_offsets[0] != 0:
        raise ValueError(
            f"lora_expand_segments: slice_offsets {tuple(slice_offsets)} for lora_dim {lora_dim}"
        )
    if num_tokens == 0:
        return y
    if y.stride(1) != 1:
        raise ValueError("lora_expand_segments: y must be contiguous along its last dimension")
    slice_k = lora_dim // num_subs
    bounds = [*slice_offsets[1:], out_features, out_features][:2]  # N1, N2
    block_k = _block_k(slice_k)
    grid = (triton.cdiv(out_features, block_n), _segment_programs(num_tokens, programs))
    _segment_expand_kernel[grid](
        t, b_stacked, segments, y, num_tokens, slice_k, bounds[0], bounds[1], out_features, split,
        t.stride(0), t.stride(1), b_stacked.stride(0), b_stacked.stride(1), y.stride(0),
        BLOCK_M=_block_m(piece, block_k), BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=_dot_precision(b_stacked.dtype),
        num_warps=num_warps,
    )  # fmt: skip
    return y
