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

The launch (programs along the segment axis, the shrink's splits, the expand's output tile) is
`segment_launch`'s, from the shapes only (tokens, piece, slots), so a CUDA graph captures the launch
its size's steps want whatever adapters they carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ops.triton.lora import _block_k, _dot_precision, expand_rows, shrink_rows, sub_matrices

BLOCK_IN = 64


@dataclass(frozen=True)
class SegmentLaunch:
    """Both kernels' launch for one step (loadtest/sweep_lora_segments.py sweeps each field)."""

    shrink_programs: int  # the shrink's programs along the segment axis (grid-stride beyond)
    total_programs: int  # the shrink splits its input dimension until programs x splits reach this
    expand_programs: int  # the expand's programs along the segment axis
    block_n: int  # the expand's output columns per program
    expand_warps: int = 4


# The launches, from the H200 sweep of loadtest/sweep_lora_segments.py at Llama-3-8B's four LoRA layers
# (rank 16, 256-token decode steps ordered by adapter; every variant checked against the reference first):
# loadtest/results/verify-h200-2026-12-03-8ed5bc2/ (sweep_lora_segments.json, sweepseg.log). A decoder
# layer's LoRA (shrink + expand over qkv, o, gate_up and down), the launch before -> this rule's:
# - A1's step, 8 adapters (16 segments): 61.8 -> 46.2 us (45.9 at each layer's own best). Shrink: 32
#   programs along the segment axis, 1,024 in all (29.3 -> 19.6 us); expand: a 256-wide output tile, 16 programs,
#   4 warps (32.5 -> 26.6 us).
# - A2's step, 64 adapters (64 segments): 116.9 -> 107.0 us (106.9). Shrink: 64 programs, 512 in all (as
#   before: 30.3 us); expand: a 256-wide tile, 32 programs, 4 warps (86.6 -> 76.8 us).
# The shrink wants a program per segment (32 programs for 64 segments cost 12%; 128 were slower), the
# expand, whose grid also spans the output tiles, half as many (at 64 segments, 64 cost 5% more). The sweep held 64 slots in
# both steps (a slot count moves no more than the weights' addresses); A1 runs at max_loras 8, which is
# what puts it on FEW_SEGMENTS. An engine at max_loras 64 whose step carries 8 adapters gets
# MANY_SEGMENTS: 56.2 us a layer in that sweep.
FEW_SEGMENTS = SegmentLaunch(shrink_programs=32, total_programs=1024, expand_programs=16, block_n=256)
MANY_SEGMENTS = SegmentLaunch(shrink_programs=64, total_programs=512, expand_programs=32, block_n=256)
# Steps above 512 tokens (64-token pieces: prefill) keep the launch from before the sweep, which measured
# decode steps only; a 256-wide tile at 64 rows a pass would double the expand's fp32 accumulator.
LARGE_STEPS = SegmentLaunch(shrink_programs=64, total_programs=512, expand_programs=64, block_n=128)
DECODE_PIECE = 16  # engine.lora.segments.SMALL_PIECE: the pieces of steps up to 512 tokens


def most_segments(num_tokens: int, piece: int, num_slots: int) -> int:
    """The most segments a step ordered by adapter (one run per slot) can have: each run's pieces are at
    most its tokens // piece + 1, so runs + num_tokens // piece in all, and at most one a token."""
    return max(0, min(num_tokens, num_slots + num_tokens // piece))


def segment_launch(num_tokens: int, piece: int, num_slots: int) -> SegmentLaunch:
    """The launch for a forward of `num_tokens` tokens (padding included) cut into `piece`-token pieces
    over `num_slots` adapter slots (max_loras): FEW_SEGMENTS when the shrink's 32 programs cover the most
    segments the step can have (A1's 256-token steps at max_loras 8: 24), MANY_SEGMENTS above (A2's at
    64: 80), LARGE_STEPS for large pieces. Shapes only, so a graph's launch fits every replay; an unsorted
    batch with more segments is still right (the kernels stride over them), only slower."""
    if piece > DECODE_PIECE:
        return LARGE_STEPS
    few = most_segments(num_tokens, piece, num_slots) <= FEW_SEGMENTS.shrink_programs
    return FEW_SEGMENTS if few else MANY_SEGMENTS


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


def _segment_programs(num_tokens: int, programs: int) -> int:
    """Programs along the segment axis: at most one a token (there are no more segments)."""
    return max(1, min(num_tokens, programs))


def _expand_block_n(launch: SegmentLaunch, block_k: int) -> int:
    """The launch's output tile, at most 128 wide past a 64-wide rank slice: the sweep measured rank 16,
    and a wider tile would make B's [block_k, block_n] tile larger than the launch before ever made it."""
    return launch.block_n if block_k <= 64 else min(launch.block_n, 128)


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
    programs: int | None = None,  # along the segment axis (None: segment_launch's)
    total_programs: int | None = None,  # the input dimension splits until programs x splits reach this
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
    launch = segment_launch(num_tokens, piece, a_stacked.shape[0])
    programs = _segment_programs(num_tokens, programs or launch.shrink_programs)
    total_programs = total_programs or launch.total_programs
    # Split the input dimension so that segments x splits fill the GPU (512-1,024 programs): a
    # segment's A is then streamed by several programs at once. Fixed by shapes only, so graphs capture it.
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
    block_n: int | None = None,  # output columns per program (None: segment_launch's, as below)
    programs: int | None = None,  # along the segment axis
    num_warps: int | None = None,
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
    launch = segment_launch(num_tokens, piece, b_stacked.shape[0])
    block_n = block_n or _expand_block_n(launch, block_k)
    num_warps = num_warps or launch.expand_warps
    grid = (
        triton.cdiv(out_features, block_n),
        _segment_programs(num_tokens, programs or launch.expand_programs),
    )
    _segment_expand_kernel[grid](
        t, b_stacked, segments, y, num_tokens, slice_k, bounds[0], bounds[1], out_features, split,
        t.stride(0), t.stride(1), b_stacked.stride(0), b_stacked.stride(1), y.stride(0),
        BLOCK_M=_block_m(piece, block_k), BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=_dot_precision(b_stacked.dtype),
        num_warps=num_warps,
    )  # fmt: skip
    return y
