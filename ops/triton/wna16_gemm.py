"""A Triton GEMM for 4- and 8-bit weight-only formats (W4A16 / W8A16) with the dequantization fused
into the inner loop: y = x w, w[k, n] = (code[k, n] - zero[k // group_size, n]) * scale[k // group_size, n].

Layout it reads (what GPTQ stores, and what AWQ repacks to by unpacking and re-packing along K):
- `qweight` int32 [K / pf, N], pf = 32 // bits codes per word along K, the lowest bits first;
- `scales`, `zeros` [G, N] floating (zeros as values, GPTQ's "gptq" offset already added back);
- groups contiguous along K (act-order GPTQ: permute K at load by argsort(g_idx) and gather x's
  columns the same way per call).
Each program computes a [BLOCK_M, BLOCK_N] tile of y: it loads a [BLOCK_K, BLOCK_N] tile of words,
shifts the codes out in registers, applies the group's zero and scale, and feeds tl.dot in x's dtype
with float32 accumulation. The spec is engine.model.quantization.common.dequantize + F.linear; the
test (tests/ops/test_wna16_gemm.py) checks it under TRITON_INTERPRET=1.

Not wired into the GPTQ/AWQ methods yet (they dequantize then call F.linear): that waits for a GPU
run of this kernel, with a split-K path for batch-1 decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _wna16_gemm_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [K / pf, N] int32
    scales_ptr,  # [G, N]
    zeros_ptr,  # [G, N]
    out_ptr,  # [M, N]
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k  # [BLOCK_K]
        mask_k = kk < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        tile_mask = mask_k[:, None] & mask_n[None, :]
        words = tl.load(
            qweight_ptr + (kk // PACK)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
            mask=tile_mask,
            other=0,
        )  # [BLOCK_K, BLOCK_N] int32, each word read PACK times (from cache)
        # (word >> shift) & MASK is the code whether the shift is arithmetic or logical
        codes = (words >> ((kk % PACK) * BITS)[:, None]) & MASK
        group = kk // group_size
        scale = tl.load(
            scales_ptr + group[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=tile_mask, other=0.0
        )
        zero = tl.load(
            zeros_ptr + group[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=tile_mask, other=0.0
        )
        w = (codes.to(tl.float32) - zero.to(tl.float32)) * scale.to(tl.float32)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(a, w.to(a.dtype))
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


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
) -> torch.Tensor:  # [M, N] in x.dtype
    M, K = x.shape
    N = qweight.shape[1]
    if qweight.shape[0] * (32 // bits) != K:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not pack K={K} at {bits} bits")
    if K % group_size or scales.shape != (K // group_size, N) or zeros.shape != scales.shape:
        raise ValueError(
            f"scales/zeros {tuple(scales.shape)} do not match K={K}, N={N}, group_size={group_size}"
        )
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _wna16_gemm_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        out,
        M,
        N,
        K,
        group_size,
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        zeros.stride(0),
        zeros.stride(1),
        out.stride(0),
        out.stride(1),
        BITS=bits,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out
