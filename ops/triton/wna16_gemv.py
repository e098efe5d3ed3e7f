"""W4A16 / W8A16 GEMV for decode-sized batches (1-4 tokens), on the layout of wna16_gemm.py:
`qweight` int32 [K / pf, N] (pf = 32 // bits codes per word along K, lowest bits first), `scales` and
`zeros` [G, N] with groups contiguous along K; w[k, n] = (code[k, n] - zero[g, n]) * scale[g, n].

Why a separate kernel: at batch 1 the fused GEMM (a 16-row tl.dot tile, codes reshaped into the dot's
operand layout, an int-to-float conversion per weight, a second launch to sum split-K partials) ran at
0.11-0.20 of the copy bandwidth on an H200; it is bound by instructions, not bytes. Here:
- each program owns BLOCK_N output columns and a K range (all of K, or 1 / SPLIT_K of it) and streams
  [BLOCK_K / pf, BLOCK_N] tiles of words, coalesced along N. Everything stays 2-D in the words' own
  layout (x's elements arrive as a vector along the tile's rows), so no tensor changes layout through
  shared memory inside the loop (a 3-D formulation did, with barriers, and ran at 0.14);
- a code becomes a float with one LOP3 and one FADD, no shift and no conversion instruction: the word
  is masked in place (code i of the low or high half-word sits at bits i * bits), OR-ed into the
  mantissa of 2**23 and 2**23 subtracted, which is exactly code * 2**(i * bits); x's element is scaled
  by 2**(-i * bits) instead (exact, a power of two). One shift per word brings the high half down;
- zero point and scale apply once per group, not per weight: sum_k x_k (c_kn - z_n) s_n =
  s_n (sum_k x_k c_kn - z_n sum_k x_k), keeping per word row the code dot and the sum of x;
- each of the 1-4 rows of x has its own accumulators (the codes are decoded once for all rows);
- the K splits' partials are summed by the last program of each tile (ops.triton.split_k), so a layer
  is one launch.
4-bit layers with integer zero points and 16-bit x take ops/triton/w4_half2_gemv.py at 1-4 tokens
instead (the codes decoded in packed fp16 with the zero point folded in: 1.1-1.5x faster on an H200);
this kernel serves 8-bit codes, float32 x and any other zero points. Its own packed-fp16 path (HALF2,
zero point applied per group) and Triton's pipelining of its loads (loop_stages, slower on every
Llama-3-8B shape: folded-gemv-h200-2026-12-04/1-sweep-9864c10) were removed once the folded GEMV
replaced them.
A tile lies in one group: BLOCK_K divides group_size (the planner, engine.model.quantization.wna16,
ensures it). The spec is engine.model.quantization.common.dequantize + F.linear
(tests/ops/test_gemv_kernels.py, under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.pdl import let_next_kernel_start, pdl_enabled, wait_for_previous_kernel
from ops.triton.split_k import (
    MAX_TILES,
    gated_rows,
    k_splits,
    rows_per_program,
    split_counters,
    store_column_tiles,
)
from ops.triton.wna16_gemm import check_layout

MAX_GEMV_TOKENS = 16  # rows of x in groups of up to 4, one group per program


@triton.jit
def _x_row(x_ptrs, offset):
    """[WORDS] float32: x at the tile's pointers plus a constant offset (folded into the load
    instruction, where per-element offsets cost two address instructions each). No mask: every tile
    lies inside K (BLOCK_K divides the group, the group K, and each split is whole tiles) and x has
    whole groups of ROWS rows (the wrapper pads it)."""
    return tl.load(x_ptrs + offset).to(tl.float32)


@triton.jit
def _code_terms(dot, lo, hi, code_lo, code_hi, x_ptrs, at, BITS: tl.constexpr):
    """One row's terms for the codes of one byte of each word: dot += x (256 + c) [+ x (16 + c')], and
    the sums of x under each magic. `at`: the byte's first code's K within the word (plus the row)."""
    x_lo = _x_row(x_ptrs, at)
    dot += code_lo * x_lo[:, None]
    lo += x_lo
    if BITS == 4:
        x_hi = _x_row(x_ptrs, at + 1)
        dot += code_hi * x_hi[:, None]
        hi += x_hi
    return dot, lo, hi


@triton.jit
def _words(word_ptrs, offset, mask_n, EVEN_N: tl.constexpr):
    """[WORDS, BLOCK_N] uint32: the tile of packed codes at word_ptrs + offset (offset: word rows times
    their stride)."""
    if EVEN_N:
        words = tl.load(word_ptrs + offset)
    else:
        words = tl.load(word_ptrs + offset, mask=mask_n[None, :], other=0)
    return words.to(tl.uint32, bitcast=True)


@triton.jit
def _wna16_gemv_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [K / pf, N] int32
    scales_ptr,  # [G, N]
    zeros_ptr,  # [G, N]
    out_ptr,  # [M, N] in x's dtype
    partials_ptr,  # [SPLIT_K, M, N] float32
    counters_ptr,  # [tiles] int32
    M,
    N,
    K,
    k_per_split,
    mask_lo,  # 0x00078000 (8-bit codes: 0x007F8000): passed in, so the compiler keeps it in a register
    mask_hi,  # 0x00780000   instead of re-materialising the constant before every LOP3  # K rows per split, a multiple of BLOCK_K
    stride_xm,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_om,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # a constant: the group index is a shift, not a division per tile
    ROWS: tl.constexpr,  # rows per program (1, 2 or 4; M is a multiple): each has its accumulators
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no column mask on the words
    PREFETCH: tl.constexpr,  # load tile i + 1 before decoding tile i (two tiles in flight per program)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (ops.triton.pdl)
    GATED: tl.constexpr = False,  # [gate | up] columns (N = 2 x half_n): silu(gate) * up stored
    half_n=0,  # GATED: the gate half's columns, the output's
):
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK  # word rows per tile
    pid_g = tl.program_id(0)  # a group of ROWS rows of x; groups side by side share each weight tile in L2
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    tile = pid_g * tl.num_programs(1) + pid_n  # this program's split-K counter
    row0 = pid_g * ROWS
    if GATED:  # BLOCK_N / 2 columns of each half, so one program sees a column's gate and up sums
        offs_n, mask_n = gated_rows(pid_n, half_n, BLOCK_N)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    offs_w = tl.arange(0, WORDS)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc0 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)  # scaled, zero-corrected sums per word row
    acc1 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    word_ptrs = qweight_ptr + offs_w[:, None] * stride_qk + offs_n[None, :]  # [WORDS, BLOCK_N] at K = 0
    if PREFETCH:
        words = _words(word_ptrs, k_start // PACK * stride_qk, mask_n, EVEN_N)
    # Weights do not depend on the kernel before this one: the first tile is requested before waiting
    # for it (with PDL, while it still runs); x, the partials and the counters only after.
    let_next_kernel_start(PDL)  # all programs resident: the next kernel may launch and wait for this one
    wait_for_previous_kernel(PDL)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            # The next tile's words are requested before this tile is decoded, so one tile is always
            # in flight while the SM works (the last iteration re-reads its own tile: no mask needed).
            k_next = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
            words_next = _words(word_ptrs, k_next // PACK * stride_qk, mask_n, EVEN_N)
        else:
            words = _words(word_ptrs, k0 // PACK * stride_qk, mask_n, EVEN_N)
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        zero = tl.load(zeros_ptr + g * stride_zg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        # Per row: sum_k x_k (M_k + c_kn) over the tile (M_k: the code's magic, 256 or 16), and the sums
        # of x over the codes of each magic, which remove the magic (and the zero point) per group.
        dot0 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        dot1 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        dot2 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        dot3 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        lo0 = tl.zeros((WORDS,), dtype=tl.float32)  # sum of x over codes decoded as 256 + c
        lo1 = tl.zeros((WORDS,), dtype=tl.float32)
        lo2 = tl.zeros((WORDS,), dtype=tl.float32)
        lo3 = tl.zeros((WORDS,), dtype=tl.float32)
        hi0 = tl.zeros((WORDS,), dtype=tl.float32)  # sum of x over codes decoded as 16 + c (4-bit only)
        hi1 = tl.zeros((WORDS,), dtype=tl.float32)
        hi2 = tl.zeros((WORDS,), dtype=tl.float32)
        hi3 = tl.zeros((WORDS,), dtype=tl.float32)
        x_ptrs = x_ptr + row0 * stride_xm + k0 + offs_w * PACK  # [WORDS]: row0's x at each word's first code
        for b in tl.static_range(4):  # byte b of each word: one 8-bit code or two 4-bit codes
            # Bring byte b to mantissa bits 15-22 (one shift for its codes), then OR in an exponent:
            # a code at bits 15-18 reads 256 + c as a float, at bits 19-22 16 + c (exact: one LOP3
            # per code, no conversion, no subtraction; 256 and 16 come off per group).
            if b < 2:
                byte = words << (15 - 8 * b)
            else:
                byte = words >> (8 * b - 15)
            if BITS == 8:
                code_lo = ((byte & mask_lo) | 0x43800000).to(tl.float32, bitcast=True)  # 256 + c
                code_hi = code_lo  # unused
                at = b
            else:
                code_lo = ((byte & mask_lo) | 0x43800000).to(tl.float32, bitcast=True)  # 256 + c[2b]
                code_hi = ((byte & mask_hi) | 0x41800000).to(tl.float32, bitcast=True)  # 16 + c[2b+1]
                at = 2 * b
            dot0, lo0, hi0 = _code_terms(dot0, lo0, hi0, code_lo, code_hi, x_ptrs, at, BITS)
            if ROWS >= 2:
                dot1, lo1, hi1 = _code_terms(dot1, lo1, hi1, code_lo, code_hi, x_ptrs, stride_xm + at, BITS)
            if ROWS >= 4:
                dot2, lo2, hi2 = _code_terms(
                    dot2, lo2, hi2, code_lo, code_hi, x_ptrs, 2 * stride_xm + at, BITS
                )
                dot3, lo3, hi3 = _code_terms(
                    dot3, lo3, hi3, code_lo, code_hi, x_ptrs, 3 * stride_xm + at, BITS
                )
        # sum_k x_k (c_kn - z_n) = dot - sum_lo x (256 + z) - sum_hi x (16 + z)
        zero_lo = zero + 256.0
        zero_hi = zero + 16.0
        acc0 += (dot0 - lo0[:, None] * zero_lo - hi0[:, None] * zero_hi) * scale
        if ROWS >= 2:
            acc1 += (dot1 - lo1[:, None] * zero_lo - hi1[:, None] * zero_hi) * scale
        if ROWS >= 4:
            acc2 += (dot2 - lo2[:, None] * zero_lo - hi2[:, None] * zero_hi) * scale
            acc3 += (dot3 - lo3[:, None] * zero_lo - hi3[:, None] * zero_hi) * scale
        if PREFETCH:
            words = words_next
    store_column_tiles(acc0, acc1, acc2, acc3, out_ptr, partials_ptr, counters_ptr, tile, row0, M, N, half_n, offs_n,
                       pid_n, stride_om, pid_k, ROWS, SPLIT_K, BLOCK_N, GATED)  # fmt: skip


def wna16_gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_GEMV_TOKENS; float16 / bfloat16 (float32 under the interpreter)
    qweight: torch.Tensor,  # [K / pf, N] int32
    scales: torch.Tensor,  # [G, N]
    zeros: torch.Tensor,  # [G, N]
    bits: int,
    group_size: int,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    prefetch: bool = False,
    gated: bool = False,
) -> torch.Tensor:  # [M, N] in x.dtype; gated: [M, N / 2]
    """y = x w with w dequantized in registers, one launch. block_k must divide group_size and be a
    multiple of 32 // bits; split_k > 1 splits K over that many programs per BLOCK_N columns; prefetch
    keeps the next tile's words in flight while one is decoded; gated: a [gate | up] weight,
    silu(gate) * up stored (N / 2 columns)."""
    M, K = x.shape
    N = qweight.shape[1]
    pack = 32 // bits
    if bits not in (4, 8):
        raise ValueError(f"wna16_gemv reads 4- or 8-bit codes; got {bits}")
    if not 1 <= M <= MAX_GEMV_TOKENS:
        raise ValueError(f"wna16_gemv takes 1 to {MAX_GEMV_TOKENS} rows; got {M}")
    check_layout(qweight, scales, zeros, K, bits, group_size)  # the GEMM's layout checks, same messages
    if group_size % block_k or block_k % pack:
        raise ValueError(f"block_k {block_k} must divide group_size {group_size} and be a multiple of {pack}")
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(
            "wna16_gemv: qweight, scales, zeros and x must be contiguous along their last dimension"
        )
    k_per_split, split_k = k_splits(K, split_k, block_k)
    if gated and (N % 2 or block_n % 2):
        raise ValueError(
            f"wna16_gemv: gated needs an even column count and block_n; got {N}, block_n {block_n}"
        )
    out_n = N // 2 if gated else N
    tiles = triton.cdiv(out_n, block_n // 2) if gated else triton.cdiv(N, block_n)
    rows = rows_per_program(M)
    if M % rows:  # the kernel masks no row: zero rows up to whole groups
        padded = torch.cat([x, x.new_zeros(rows - M % rows, K)])
        return wna16_gemv(padded, qweight, scales, zeros, bits, group_size, block_n, block_k, split_k, num_warps,
                          num_stages, prefetch, gated)[:M]  # fmt: skip
    groups = M // rows
    pdl = pdl_enabled(x.device)
    if split_k > 1 and tiles * groups > MAX_TILES:
        raise ValueError(f"wna16_gemv: {tiles * groups} tiles exceed the split-K workspace ({MAX_TILES})")
    out = torch.empty(M, out_n, dtype=x.dtype, device=x.device)
    partial_n = tiles * block_n if gated else N  # a gated tile's partials at its virtual columns
    partials = (
        torch.empty(split_k, M, partial_n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    )
    _wna16_gemv_kernel[(groups, tiles, split_k)](
        x, qweight, scales, zeros, out, partials, split_counters(x.device),
        M, N, K, k_per_split, 0x007F8000 if bits == 8 else 0x00078000, 0x00780000,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size, ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, EVEN_N=out_n % (block_n // 2) == 0 if gated else N % block_n == 0,
        PREFETCH=prefetch, PDL=pdl, GATED=gated, half_n=out_n, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return out
