"""FP8-weight GEMV for decode-sized batches (1-4 tokens): W8A16, y = x (w * scale)^T.

`weight` float8 (e4m3) [N, K] as checkpoints store it, one float32 scale per output row. At batch 1
the W8A8 path (quantize x per token, then torch._scaled_mm) ran at 1.48x bf16's latency on an H200:
two extra kernels per layer for x's scale and cast, and a GEMM tiled for large M. Here each program
owns BLOCK_N rows of the weight and a K range, streams [BLOCK_N, BLOCK_K] tiles (contiguous along K),
converts them in registers and multiplies by x kept in 16/32-bit: one launch, no activation
quantization, and the K splits summed by the tile's last program (ops.triton.split_k).

The weight tile is read VEC columns per thread, VEC being x's elements per 16-byte load (8 for
bf16), even where the weight's own elements are narrower (FP8 could take 16): then, with BLOCK_K =
VEC * 32 * num_warps, the tile's columns and x's vector fall on the threads in the same order, and x
is used where it was loaded. Otherwise the compiler moves x into the tile's layout through shared
memory every tile, with barriers between the warps (the FP8 GEMV's 256-wide tiles did, and ran
at 0.50-0.58 of the copy bandwidth on the attention projections; sm_90 SASS, loadtest/sweep_gemv.py).

A static activation scale (`input_scale`, activation_scheme "static") is applied as the W8A8 GEMM
and the CPU reference apply it: x quantized to FP8 with it and dequantized, per element, on load.
The spec is dequantize (w * scale in float32) + F.linear (tests/ops/test_fp8_gemv.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.fp8_quant import _to_fp8, hardware_fp8_conversion
from ops.triton.l2_prefetch import l2_next_args, prefetch_next_weights
from ops.triton.pdl import let_next_kernel_start, pdl_enabled, wait_for_previous_kernel
from ops.triton.split_k import (
    MAX_TILES,
    gated_rows,
    k_splits,
    rows_per_program,
    split_counters,
    store_rows,
    store_rows_gated,
)

MAX_GEMV_TOKENS = 16  # rows of x in groups of up to 4, one group per program


@triton.jit
def _x_tile(x_ptr, row, stride_xm, kk, mask_k, s_in, STATIC_INPUT: tl.constexpr, HW_CVT: tl.constexpr):
    """[BLOCK_K] float32: a row of x, as the FP8 GEMM sees it when the scale is static: fp8(x / s) * s
    (HW_CVT: the GPU's conversion; else exact rounding in software, where the interpreter's own cast
    mis-rounds values that carry into the next power of two)."""
    x = tl.load(x_ptr + row * stride_xm + kk, mask=mask_k, other=0.0).to(tl.float32)  # row: of this group
    if STATIC_INPUT:
        x = _to_fp8(x / s_in, HW_CVT).to(tl.float32) * s_in
    return x


@triton.jit
def _w_tile(w_ptrs, k0, k_end, mask_n, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] float32: the weight tile at K offset k0 (columns past k_end read as 0)."""
    mask_k = k0 + tl.arange(0, BLOCK_K) < k_end
    return tl.load(w_ptrs + k0, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)


@triton.jit
def _tile_terms(acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, kk, mask_k, s_in, ROWS: tl.constexpr,
                STATIC_INPUT: tl.constexpr, HW_CVT: tl.constexpr):  # fmt: skip
    """Each row's accumulator plus the weight tile w [BLOCK_N, BLOCK_K] times that row of x at columns kk."""
    acc0 += w * _x_tile(x_ptr, 0, stride_xm, kk, mask_k, s_in, STATIC_INPUT, HW_CVT)[None, :]
    if ROWS >= 2:
        acc1 += w * _x_tile(x_ptr, 1, stride_xm, kk, mask_k, s_in, STATIC_INPUT, HW_CVT)[None, :]
    if ROWS >= 4:
        acc2 += w * _x_tile(x_ptr, 2, stride_xm, kk, mask_k, s_in, STATIC_INPUT, HW_CVT)[None, :]
        acc3 += w * _x_tile(x_ptr, 3, stride_xm, kk, mask_k, s_in, STATIC_INPUT, HW_CVT)[None, :]
    return acc0, acc1, acc2, acc3


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] float8
    scale_ptr,  # [N] float32
    input_scale_ptr,  # [1] float32 (read when STATIC_INPUT)
    out_ptr,  # [M, N]
    partials_ptr,  # [SPLIT_K, M, N] float32
    counters_ptr,  # [tiles] int32
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    ROWS: tl.constexpr,  # rows per program (1, 2 or 4; M is a multiple, the wrapper pads): an accumulator each
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STATIC_INPUT: tl.constexpr,
    PREFETCH: tl.constexpr,  # load tile i + 1 before using tile i
    PDL: tl.constexpr,  # launched with programmatic dependent launch (ops.triton.pdl)
    VEC: tl.constexpr,  # x's elements per 16-byte load: the weight tile's columns per thread too
    GATED: tl.constexpr = False,  # a [gate; up] weight (N = 2 x half_n rows): silu(gate) * up stored
    half_n=0,  # GATED: the gate half's rows, the output's columns
    prefetch_ptr=None,  # (L2_PREFETCH) bytes of the next projection's weights (ops/triton/l2_prefetch.py)
    prefetch_bytes=0,
    prefetch_second=0,  # > 0: a second range at this byte offset (a [gate; up] weight's up half)
    L2_PREFETCH: tl.constexpr = False,
    HW_CVT: tl.constexpr = True,  # STATIC_INPUT: the GPU's fp8 conversion (else software: the interpreter)
    LOOP_STAGES: tl.constexpr = 1,  # > 1: Triton pipelines the loop's loads through shared memory
):
    pid_g = tl.program_id(0)  # a group of ROWS rows of x; groups side by side share each weight tile in L2
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    tile = pid_g * tl.num_programs(1) + pid_n  # this program's split-K counter
    row0 = pid_g * ROWS
    if GATED:  # BLOCK_N / 2 rows of each half, so one program sees a column's gate and up rows
        offs_n, mask_n = gated_rows(pid_n, half_n, BLOCK_N)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_ptr += row0 * stride_xm
    s_in = tl.load(input_scale_ptr) if STATIC_INPUT else 1.0
    # [BLOCK_N, BLOCK_K] per row, reduced over K once at the end; 2-D in the weight tile's layout so
    # nothing changes layout inside the loop (x arrives as a vector along the tile's columns)
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    # [BLOCK_N, BLOCK_K] at K = 0; runs of VEC columns, so the tile gets x's layout (module docstring)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + tl.max_contiguous(offs_k, VEC)[None, :]
    k_last = k_start + (k_end - 1 - k_start) // BLOCK_K * BLOCK_K  # the split's last tile
    if PREFETCH:
        w = _w_tile(w_ptrs, k_start, k_end, mask_n, BLOCK_K)
    # Weights do not depend on the kernel before this one: with PDL the first tile is requested while it
    # still runs; x and every write come after the wait.
    let_next_kernel_start(PDL)  # all programs resident: the next kernel may launch and wait for this one
    wait_for_previous_kernel(PDL)
    # LOOP_STAGES > 1: Triton's pipelining of the tile loads (cp.async into shared memory, that many stages);
    # 1: no pipelining, the loads in registers (ahead with PREFETCH)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=LOOP_STAGES):
        kk = k0 + offs_k
        mask_k = kk < k_end
        if PREFETCH:  # the next tile in flight while this one is used (the last re-reads itself)
            w_next = _w_tile(w_ptrs, tl.minimum(k0 + BLOCK_K, k_last), k_end, mask_n, BLOCK_K)
        else:
            w = _w_tile(w_ptrs, k0, k_end, mask_n, BLOCK_K)
        acc0, acc1, acc2, acc3 = _tile_terms(acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, kk, mask_k, s_in, ROWS,
                                             STATIC_INPUT, HW_CVT)  # fmt: skip
        if PREFETCH:
            w = w_next
    if L2_PREFETCH:  # this program's tiles are read: its slice of the next weights
        prefetch_next_weights(prefetch_ptr, prefetch_bytes, prefetch_second)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]
    if GATED:
        offs_v = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the tile's virtual columns (split partials)
        store_rows_gated(
            tl.sum(acc0, axis=1) * scale, tl.sum(acc1, axis=1) * scale,
            tl.sum(acc2, axis=1) * scale, tl.sum(acc3, axis=1) * scale,
            out_ptr, partials_ptr, counters_ptr, tile, row0, M, half_n, tl.num_programs(1) * BLOCK_N, offs_v,
            stride_om, pid_k, ROWS, SPLIT_K,
        )  # fmt: skip
    else:
        store_rows(
            tl.sum(acc0, axis=1) * scale, tl.sum(acc1, axis=1) * scale,
            tl.sum(acc2, axis=1) * scale, tl.sum(acc3, axis=1) * scale,
            out_ptr, partials_ptr, counters_ptr, tile, row0, M, N, offs_n, stride_om, pid_k, ROWS, SPLIT_K,
        )  # fmt: skip


def fp8_gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_GEMV_TOKENS
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N] float32
    input_scale: torch.Tensor | None = None,  # [1] float32: static activation scale; None: x as is
    block_n: int = 16,
    block_k: int = 256,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    prefetch: bool = False,
    gated: bool = False,
    l2_next: torch.Tensor | None = None,  # [bytes] uint8: asked of L2 as the programs finish
    loop_stages: int = 1,
) -> torch.Tensor:  # [M, N] in x.dtype; gated: [M, N / 2]
    """y = x (weight * weight_scale[:, None])^T, one launch; split_k > 1 splits K per BLOCK_N rows;
    prefetch keeps the next weight tile in flight (and lets the launch use PDL, ops.triton.pdl).
    block_k = 8 * 32 * num_warps (bf16 / fp16 x) keeps x out of shared memory (module docstring).
    gated: weight is [gate; up] (a MergedColumnParallelLinear's); y = silu(x gate^T) * (x up^T), each
    tile taking block_n / 2 rows of both halves. l2_next: the next projection's weight bytes (a flat uint8
    view, 16-byte aligned, or [2, n] for two ranges: l2_prefetch.l2_next_args), each program asking L2 for its slice once its tiles are read
    (ops/triton/l2_prefetch.py; sm_90; the outputs unchanged). loop_stages > 1 (not with prefetch): Triton
    pipelines the tile loads through shared memory (cp.async, sm_80+), that many stages: the GEMV waits on
    memory for most of its samples (loadtest/results/w4-pipeline-stalls-h100-2026-12-07-1396ef1/) with
    ~28 KB an SM in flight at the planned launch; compiled for sm_90 (triton 3.9), 3 stages take 64 registers
    and 6 KB of shared memory a program (2 warps, 4 x 512 tiles), ~64 KB an SM in flight; the outputs are the
    same bits. Slower in the engine: the FP8 batch-1 step 3.469 against 3.423 ms on an H100 at 55cf415 (Q2 0.634x
    against 0.625x). At one token no tile is loaded before PDL's wait: prefetch (a tile kept ahead through the loop)
    made the FP8 batch-1 step 11% slower on an H100 (3.390 -> 3.770 ms, ba6732c), and the first tile alone loaded
    before the wait and used by a peeled first turn (no tile ahead after it; the same bits) 6% slower (Q2 0.608x ->
    0.645x, 3.363 -> 3.569 ms, e507e83, loadtest/results/decode-attn-h100-2026-12-07-e507e83/); both removed. Its rows asked of L2 (bulk
    prefetches) before the wait instead: 4.8% slower (ops/triton/l2_prefetch.py); removed too."""
    M, K = x.shape
    N = weight.shape[0]
    if not 1 <= M <= MAX_GEMV_TOKENS:
        raise ValueError(f"fp8_gemv takes 1 to {MAX_GEMV_TOKENS} rows; got {M}")
    if weight.shape[1] != K or weight_scale.shape != (N,):
        raise ValueError(
            f"fp8_gemv: x {tuple(x.shape)}, weight {tuple(weight.shape)}, scale {tuple(weight_scale.shape)}"
        )
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("fp8_gemv: weight and x must be contiguous along K")
    if loop_stages < 1 or (loop_stages > 1 and prefetch):
        raise ValueError(
            f"fp8_gemv: loop_stages is 1, or more without prefetch; got {loop_stages}, prefetch {prefetch}"
        )
    if gated and (N % 2 or block_n % 2):
        raise ValueError(
            f"fp8_gemv: gated needs an even row count and block_n; got {N} rows, block_n {block_n}"
        )
    k_per_split, split_k = k_splits(K, split_k, block_k)
    out_n = N // 2 if gated else N
    tiles = triton.cdiv(out_n, block_n // 2) if gated else triton.cdiv(N, block_n)
    rows = rows_per_program(M)
    if M % rows:  # zero rows up to whole groups
        padded = torch.cat([x, x.new_zeros(rows - M % rows, K)])
        return fp8_gemv(padded, weight, weight_scale, input_scale, block_n, block_k, split_k, num_warps, num_stages,
                        prefetch, gated, l2_next, loop_stages)[:M]  # fmt: skip
    groups = M // rows
    if split_k > 1 and tiles * groups > MAX_TILES:
        raise ValueError(f"fp8_gemv: {tiles * groups} tiles exceed the split-K workspace ({MAX_TILES})")
    out = torch.empty(M, out_n, dtype=x.dtype, device=x.device)
    partial_n = tiles * block_n if gated else N  # a gated tile's partials at its virtual columns
    partials = (
        torch.empty(split_k, M, partial_n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    )
    static = input_scale is not None
    pdl = pdl_enabled(x.device)
    l2_bytes, l2_second = l2_next_args("fp8_gemv", l2_next)
    _fp8_gemv_kernel[(groups, tiles, split_k)](
        x, weight, weight_scale, input_scale if static else weight_scale, out, partials, split_counters(x.device),
        M, N, K, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        STATIC_INPUT=static, PREFETCH=prefetch, PDL=pdl, VEC=16 // x.element_size(), GATED=gated, half_n=out_n,
        prefetch_ptr=out if l2_next is None else l2_next,
        prefetch_bytes=l2_bytes,
        prefetch_second=l2_second,
        L2_PREFETCH=l2_next is not None and x.device.type == "cuda", HW_CVT=hardware_fp8_conversion(x),
        LOOP_STAGES=loop_stages, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return out
