"""FP8-weight GEMV for decode-sized batches (1-4 tokens): W8A16, y = x (w * scale)^T.

`weight` float8 (e4m3) [N, K] as checkpoints store it, one float32 scale per output row. At batch 1
the W8A8 path (quantize x per token, then torch._scaled_mm) ran at 1.48x bf16's latency on an H200:
two extra kernels per layer for x's scale and cast, and a GEMM tiled for large M. Here each program
owns BLOCK_N rows of the weight and a K range, streams [BLOCK_N, BLOCK_K] tiles (contiguous along K),
converts them in registers and multiplies by x kept in 16/32-bit: one launch, no activation
quantization, and the K splits summed by the tile's last program (ops.triton.split_k).

A static activation scale (`input_scale`, activation_scheme "static") is applied as the W8A8 GEMM
and the CPU reference apply it: x quantized to FP8 with it and dequantized, per element, on load.
The spec is dequantize (w * scale in float32) + F.linear (tests/ops/test_fp8_gemv.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.split_k import MAX_TILES, split_counters, store_split_k

MAX_GEMV_TOKENS = 4
FP8_MAX = 448.0


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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STATIC_INPUT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if STATIC_INPUT:
        s_in = tl.load(input_scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over K once, at the end
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < k_end
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        if STATIC_INPUT:  # x as the FP8 GEMM sees it
            q = tl.minimum(tl.maximum(x / s_in, -FP8_MAX), FP8_MAX)
            x = q.to(w_ptr.dtype.element_ty).to(tl.float32) * s_in
        acc += x[:, None, :] * w[None, :, :]
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]
    store_split_k(
        tl.sum(acc, axis=2) * scale[None, :], out_ptr, partials_ptr, counters_ptr, offs_m, offs_n, M, N,
        stride_om, pid_n, pid_k, SPLIT_K,
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
) -> torch.Tensor:  # [M, N] in x.dtype
    """y = x (weight * weight_scale[:, None])^T, one launch; split_k > 1 splits K per BLOCK_N rows."""
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
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    tiles = triton.cdiv(N, block_n)
    if split_k > 1 and tiles > MAX_TILES:
        raise ValueError(f"fp8_gemv: {tiles} row tiles exceed the split-K workspace ({MAX_TILES})")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    partials = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if split_k > 1 else out
    static = input_scale is not None
    _fp8_gemv_kernel[(tiles, split_k)](
        x, weight, weight_scale, input_scale if static else weight_scale, out, partials, split_counters(x.device),
        M, N, K, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        STATIC_INPUT=static, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
