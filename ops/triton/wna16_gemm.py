"""Triton kernels for 4- and 8-bit weight-only formats (W4A16 / W8A16): a GEMM with the dequantization
fused into its inner loop, with split-K for small batches, and a dequantizing kernel for large ones.
w[k, n] = (code[k, n] - zero[k // group_size, n]) * scale[k // group_size, n]; y = x w.

Layout both read (what GPTQ stores, and what AWQ is repacked to at load by unpacking and re-packing
along K; engine.model.quantization.wna16):
- `qweight` int32 [K / pf, N], pf = 32 // bits codes per word along K, the lowest bits first;
- `scales`, `zeros` [G, N] floating (zeros as values, GPTQ's "gptq" offset already added back);
- groups contiguous along K (act-order GPTQ: K permuted at load by argsort(g_idx), x's columns
  gathered the same way per call).

`wna16_gemm`: each program computes a [BLOCK_M, BLOCK_N] tile of y over its share of K (all of it, or
1 / SPLIT_K). Per step it loads a [BLOCK_K / pf, BLOCK_N] tile of words once, shifts the pf codes of
each word out in registers, applies the group's zero and scale (one row of them when the tile lies in
one group, else per row) and feeds tl.dot in x's dtype with float32 accumulation. At batch 1-16 the
(M, N) tiles are too few to fill the GPU and every weight byte is read once, so SPLIT_K > 1 splits K
over more programs: each writes a float32 partial [SPLIT_K, M, N], summed and cast after by one small
kernel (_split_k_sum_kernel). Launch shapes are
chosen by engine.model.quantization.wna16.plan_wna16 (a pure function of the shape).

`lut_gemm` / `lut_dequantize`: the same kernels for SqueezeLLM's layout (GPTQ's qweight packing, and
per output column a table of 2**bits weight values instead of scales and zeros: w[k, n] =
table[n, code[k, n]], a gather from 32 cache-resident bytes per column).

`wna16_dequantize`: the whole [K, N] weight in x's dtype, for large batches where cuBLAS's GEMM on it
beats a fused kernel and the weight's one extra write and read are small next to the matmul.

The spec is engine.model.quantization.common.dequantize + F.linear; tests/ops/test_wna16_gemm.py checks
both kernels against it under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.split_k import k_splits


@triton.jit
def _dequant_tile(
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    k0,  # first K row of the tile (a multiple of BLOCK_K)
    k_end,  # rows at or past this are masked
    offs_n,  # [BLOCK_N]
    mask_n,  # [BLOCK_N]
    group_size,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_GROUP: tl.constexpr,  # the tile lies in one group (group_size % BLOCK_K == 0)
    GATHER_WORDS: tl.constexpr,  # load each row's word (PACK loads of it, from cache) instead of reshaping
    LUT: tl.constexpr,  # SqueezeLLM: w = scales[n, code] (a per-column table; strides sn, sg), no zeros
):
    """[BLOCK_K, BLOCK_N] float32 weights of rows k0 .. k0 + BLOCK_K."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if GATHER_WORDS:
        # AutoGPTQ's Triton kernel's way: a [BLOCK_K, BLOCK_N] load of words, row k reading word k // PACK
        kk = k0 + tl.arange(0, BLOCK_K)
        words = tl.load(
            qweight_ptr + (kk // PACK)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
            mask=(kk < k_end)[:, None] & mask_n[None, :],
            other=0,
        )
        codes = (words >> ((kk % PACK) * BITS)[:, None]) & MASK
    else:
        word_rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)  # [BLOCK_K / PACK]
        words = tl.load(
            qweight_ptr + word_rows[:, None] * stride_qk + offs_n[None, :] * stride_qn,
            mask=(word_rows < (k_end + PACK - 1) // PACK)[:, None] & mask_n[None, :],
            other=0,
        )  # [BLOCK_K / PACK, BLOCK_N] int32: each word read once
        shifts = tl.arange(0, PACK) * BITS  # [PACK]
        # (word >> shift) & MASK is the code whether the shift is arithmetic or logical
        codes = (words[:, None, :] >> shifts[None, :, None]) & MASK  # [BLOCK_K / PACK, PACK, BLOCK_N]
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))  # row k0 + i at i
    if LUT:  # a gather from each column's 2**BITS entries (L1-resident)
        table = tl.load(
            scales_ptr + offs_n[None, :] * stride_sn + codes * stride_sg, mask=mask_n[None, :], other=0.0
        )
        return table.to(tl.float32)
    codes = codes.to(tl.float32)
    if ONE_GROUP:
        g = k0 // group_size
        scale = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
        zero = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0.0)
        return (codes - zero.to(tl.float32)[None, :]) * scale.to(tl.float32)[None, :]
    kk = k0 + tl.arange(0, BLOCK_K)
    group = kk // group_size
    tile_mask = (kk < k_end)[:, None] & mask_n[None, :]
    scale = tl.load(
        scales_ptr + group[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=tile_mask, other=0.0
    )
    zero = tl.load(
        zeros_ptr + group[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=tile_mask, other=0.0
    )
    return (codes - zero.to(tl.float32)) * scale.to(tl.float32)


@triton.jit
def _wna16_gemm_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [K / pf, N] int32
    scales_ptr,  # [G, N]
    zeros_ptr,  # [G, N]
    out_ptr,  # [M, N] in x's dtype (SPLIT_K == 1), or [SPLIT_K, M, N] float32 partials
    M,
    N,
    K,
    group_size,
    k_per_split,  # K rows per split (a multiple of BLOCK_K)
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_os,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    GATHER_WORDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 activations (tl.dot would use TF32), else "tf32"
    LUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=mask_m[:, None] & (kk < k_end)[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = _dequant_tile(
            qweight_ptr, scales_ptr, zeros_ptr, k0, k_end, offs_n, mask_n, group_size,
            stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, BLOCK_N, BLOCK_K, ONE_GROUP, GATHER_WORDS, LUT,
        )  # fmt: skip
        acc += tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION)
    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _wna16_dequant_kernel(
    qweight_ptr,  # [K / pf, N] int32
    scales_ptr,  # [G, N]
    zeros_ptr,  # [G, N]
    out_ptr,  # [K, N]
    N,
    K,
    group_size,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_ok,
    stride_on,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    LUT: tl.constexpr,
):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w = _dequant_tile(
        qweight_ptr, scales_ptr, zeros_ptr, k0, K, offs_n, mask_n, group_size,
        stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
        BITS, BLOCK_N, BLOCK_K, ONE_GROUP, False, LUT,
    )  # fmt: skip
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        out_ptr + kk[:, None] * stride_ok + offs_n[None, :] * stride_on,
        w.to(out_ptr.dtype.element_ty),
        mask=(kk < K)[:, None] & mask_n[None, :],
    )


@triton.jit
def _split_k_sum_kernel(
    partials_ptr,  # [SPLIT_K, M * N] float32, contiguous
    out_ptr,  # [M * N] in x's dtype, contiguous
    numel,  # M * N
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = sum over the splits, in float32, cast once: one launch where torch needs a sum and a cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partials_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def check_layout(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, bits: int, group_size: int
) -> int:
    n = qweight.shape[1]
    if qweight.shape[0] * (32 // bits) != k:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not pack K={k} at {bits} bits")
    if k % group_size or scales.shape != (k // group_size, n) or zeros.shape != scales.shape:
        raise ValueError(
            f"scales/zeros {tuple(scales.shape)} do not match K={k}, N={n}, group_size={group_size}"
        )
    return n


def wna16_gemm(
    x: torch.Tensor,  # [M, K] float16 / bfloat16 (float32 under the interpreter)
    qweight: torch.Tensor,  # [K / pf, N] int32
    scales: torch.Tensor,  # [G, N]
    zeros: torch.Tensor,  # [G, N]
    bits: int,
    group_size: int,
    block_m: int = 16,
    block_n: int = 32,
    block_k: int = 32,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    gather_words: bool = False,
) -> torch.Tensor:  # [M, N] in x.dtype
    """y = x w with w dequantized tile by tile. block_k must be a multiple of 32 // bits; split_k > 1
    splits K over that many programs per output tile (partials summed in float32). gather_words: the
    other way to unpack (see _dequant_tile), for the GPU benchmark to compare."""
    check_layout(qweight, scales, zeros, x.shape[1], bits, group_size)
    tables = (scales, zeros, scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1))
    return _gemm(x, qweight, tables, bits, group_size, block_m, block_n, block_k, split_k, num_warps,
                 num_stages, gather_words, lut=False)  # fmt: skip


def lut_gemm(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K / pf, N] int32
    table: torch.Tensor,  # [N, 2 ** bits]: each output column's weight values (SqueezeLLM)
    bits: int,
    block_m: int = 16,
    block_n: int = 32,
    block_k: int = 32,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:  # [M, N] in x.dtype
    """y = x w, w[k, n] = table[n, code[k, n]], looked up tile by tile (the same GEMM, split-K)."""
    _check_table(qweight, table, x.shape[1], bits)
    tables = (table, table, table.stride(1), table.stride(0), 0, 0)  # entry stride, column stride
    return _gemm(x, qweight, tables, bits, x.shape[1], block_m, block_n, block_k, split_k, num_warps,
                 num_stages, False, lut=True)  # fmt: skip


def _check_table(qweight: torch.Tensor, table: torch.Tensor, k: int, bits: int) -> None:
    if qweight.shape[0] * (32 // bits) != k:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not pack K={k} at {bits} bits")
    if table.shape != (qweight.shape[1], 1 << bits):
        raise ValueError(f"table {tuple(table.shape)} is not [N={qweight.shape[1]}, {1 << bits}]")


def _gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    tables: tuple,  # (scales, zeros, stride_sg, stride_sn, stride_zg, stride_zn)
    bits: int,
    group_size: int,
    block_m: int,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
    gather_words: bool,
    lut: bool,
) -> torch.Tensor:
    M, K = x.shape
    N = qweight.shape[1]
    scales, zeros, sg, sn, zg, zn = tables
    if block_k % (32 // bits):
        raise ValueError(f"block_k {block_k} is not a multiple of {32 // bits} (codes per word)")
    k_per_split, split_k = k_splits(K, split_k, block_k)
    if split_k == 1:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        so, sm, so_n = 0, out.stride(0), out.stride(1)
    else:
        out = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        so, sm, so_n = out.stride()
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _wna16_gemm_kernel[grid](
        x, qweight, scales, zeros, out,
        M, N, K, group_size, k_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        sg, sn, zg, zn,
        so, sm, so_n,
        BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        ONE_GROUP=group_size % block_k == 0, GATHER_WORDS=gather_words, LUT=lut,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split_k == 1:
        return out
    summed = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block = 1024
    _split_k_sum_kernel[(triton.cdiv(M * N, block),)](out, summed, M * N, SPLIT_K=split_k, BLOCK=block)
    return summed


def wna16_dequantize(
    qweight: torch.Tensor,  # [K / pf, N] int32
    scales: torch.Tensor,  # [G, N]
    zeros: torch.Tensor,  # [G, N]
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:  # [K, N] in dtype
    K = qweight.shape[0] * (32 // bits)
    check_layout(qweight, scales, zeros, K, bits, group_size)
    tables = (scales, zeros, scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1))
    return _dequantize(qweight, tables, bits, group_size, dtype, block_n, block_k, lut=False)


def lut_dequantize(
    qweight: torch.Tensor,  # [K / pf, N] int32
    table: torch.Tensor,  # [N, 2 ** bits]
    bits: int,
    dtype: torch.dtype,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:  # [K, N] in dtype
    K = qweight.shape[0] * (32 // bits)
    _check_table(qweight, table, K, bits)
    tables = (table, table, table.stride(1), table.stride(0), 0, 0)
    return _dequantize(qweight, tables, bits, K, dtype, block_n, block_k, lut=True)


def _dequantize(
    qweight: torch.Tensor,
    tables: tuple,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    block_n: int,
    block_k: int,
    lut: bool,
) -> torch.Tensor:
    K, N = qweight.shape[0] * (32 // bits), qweight.shape[1]
    scales, zeros, sg, sn, zg, zn = tables
    out = torch.empty(K, N, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(K, block_k), triton.cdiv(N, block_n))
    _wna16_dequant_kernel[grid](
        qweight, scales, zeros, out, N, K, group_size,
        qweight.stride(0), qweight.stride(1), sg, sn, zg, zn, out.stride(0), out.stride(1),
        BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, ONE_GROUP=group_size % block_k == 0, LUT=lut,
        num_warps=4,
    )  # fmt: skip
    return out
