"""FP8 experts (W8A16, ops.moe_quant.Fp8ExpertScales) at decode batches: the fused MoE as two GEMVs, one
program per (token, k) pair and tile of weight rows, as ops/triton/moe_wna16_gemv.py does for integer
experts.

Why: the grouped GEMM's FP8 variant (ops.triton.fused_moe, W_FP8: fp8 tiles converted before a 16-row
tl.dot) left a Qwen3-30B-A3B-shaped model's batch-1 step at 0.985x bf16's on an H100 (4.568 against
4.636 ms, `ea07e6f`) though its experts read half the bytes. Here each program reads its expert id
from topk_ids (no alignment) and streams [BLOCK_N, BLOCK_K] tiles of the expert's [N, K] fp8 rows
(contiguous along K, as checkpoints store them), converted in registers and multiplied by x kept in
16/32-bit, the dense FP8 GEMV's tile (ops/triton/fp8_gemv.py: BLOCK_K = x's elements per 16-byte load
x 32 x num_warps, so the tile's columns fall on the threads as x's vector does and x never moves
through shared memory).
- Scales per output channel ([E, N, 1]) multiply each row's sum once; per block ([E, N / bn, K / bk])
  each tile is scaled element-wise by its blocks' scales (gathered; they stay in L1).
- A static input scale (A_QDQ) passes x (GEMM 1) or the SiLU-mul (GEMM 2) through fp8 and back on load,
  what the grouped GEMM and the reference do.
- GEMM 1 ([gate; up]): a tile holds BLOCK_N / 2 gate rows and the matching up rows and stores
  silu(gate) * up; GEMM 2 multiplies by the pair's routing weight; K splits summed by the tile's last
  program (ops.triton.split_k).
Measured on an H100 at 47f3e96 (loadtest/results/moe-int-gemv-h100-2026-12-06-a38b72f/call4-47f3e96/,
bench_quant's Q2 at the Qwen3-30B-A3B shape, per-channel FP8 experts, batch-1 ITL): 3.243 ms against
4.568 with the grouped GEMM (bf16 experts: 4.587 ms), Q2 0.707x against 0.994x.

Numerics: products and sums in float32 on unrounded w * scale (the reference rounds the dequantized
weight to x's dtype first). Spec: ops.reference.fused_moe (tests/ops/test_moe_fp8_gemv.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.env_flags import env_flag
from ops.moe_quant import Fp8ExpertScales
from ops.triton.fp8_gemv import _w_tile, _x_tile
from ops.triton.fp8_quant import hardware_fp8_conversion
from ops.triton.moe_gemv_common import pair_buffers, pair_program, two_gemvs
from ops.triton.split_k import split_counters, store_rows, store_rows_gated

MOE_FP8_GEMV_MAX_TOKENS = 8  # decode batches at most this large take the GEMV (fused_moe.py dispatches)


@triton.jit
def _moe_fp8_gemv_kernel(
    a_ptr,  # [rows, K]: GEMM 1 the tokens' hidden states (row = pair // TOP_K), GEMM 2 [pairs, K]
    w_ptr,  # [E, N, K] float8, contiguous along K
    scale_ptr,  # [E, N, 1] or [E, N / bn, K / bk] float32
    input_scale_ptr,  # [1] float32 (STATIC_INPUT)
    out_ptr,  # [pairs, N] (GATED: [pairs, N / 2]) in a's dtype
    partials_ptr,  # [SPLIT_K, pairs, N or tiles x BLOCK_N] float32
    counters_ptr,  # [tiles] int32 split-K tickets
    topk_ids_ptr,  # [pairs] each pair's expert
    weights_ptr,  # [pairs] float32 routing weights (ROUTED)
    num_pairs,
    N,  # the weight's rows (GATED: gate and up)
    K,
    k_per_split,
    group_n,  # BLOCKED: a scale's rows and columns (bn, bk)
    group_k,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_sk,
    stride_om,
    TOP_K: tl.constexpr,  # pairs a row of a serves (GEMM 1: top_k; GEMM 2: 1)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCKED: tl.constexpr,
    STATIC_INPUT: tl.constexpr,
    GATED: tl.constexpr,
    ROUTED: tl.constexpr,
    VEC: tl.constexpr,  # x's elements per 16-byte load: the weight tile's columns per thread too
    HW_CVT: tl.constexpr,  # STATIC_INPUT: the GPU's fp8 conversion (else software: the interpreter)
):
    pair, pid_n, pid_k, tile, half_n, offs_n, mask_n, expert = pair_program(topk_ids_ptr, N, BLOCK_N, GATED)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    s_in = tl.load(input_scale_ptr) if STATIC_INPUT else 1.0
    offs_k = tl.arange(0, BLOCK_K)
    # [BLOCK_N, BLOCK_K] at K = 0, runs of VEC columns (x's layout: fp8_gemv's module docstring)
    w_ptrs = (
        w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + tl.max_contiguous(offs_k, VEC)[None, :]
    )
    scale_ptrs = scale_ptr + expert * stride_se
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over K once at the end
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < k_end
        w = _w_tile(w_ptrs, k0, k_end, mask_n, BLOCK_K)
        if BLOCKED:  # each element times its block's scale
            block_scale = (
                scale_ptrs + (offs_n // group_n)[:, None] * stride_sn + (kk // group_k)[None, :] * stride_sk
            )
            w *= tl.load(block_scale, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += w * _x_tile(a_ptr, pair // TOP_K, stride_am, kk, mask_k, s_in, STATIC_INPUT, HW_CVT)[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if not BLOCKED:
        y *= tl.load(scale_ptrs + offs_n * stride_sn, mask=mask_n, other=0.0)
    if ROUTED:
        y *= tl.load(weights_ptr + pair)
    if GATED:
        offs_v = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the tile's virtual columns (split partials)
        store_rows_gated(y, y, y, y, out_ptr, partials_ptr, counters_ptr, tile, pair, num_pairs, half_n,
                         tl.num_programs(1) * BLOCK_N, offs_v, stride_om, pid_k, 1, SPLIT_K)  # fmt: skip
    else:
        store_rows(y, y, y, y, out_ptr, partials_ptr, counters_ptr, tile, pair, num_pairs, N, offs_n, stride_om,
                   pid_k, 1, SPLIT_K)  # fmt: skip


def fp8_gemv_applies(hidden: torch.Tensor, w13: torch.Tensor) -> bool:
    """Whether fused_moe runs these experts as the GEMVs: WEIR_MOE_FP8_GEMV on, a decode batch, weights
    contiguous along K (else the grouped GEMM)."""
    return env_flag("WEIR_MOE_FP8_GEMV") and hidden.shape[0] <= MOE_FP8_GEMV_MAX_TOKENS and w13.stride(2) == 1


def launch_moe_fp8_gemv(
    a: torch.Tensor,  # [rows, K]
    w: torch.Tensor,  # [E, N, K] float8_e4m3fn
    scale: torch.Tensor,  # [E, N, 1] or [E, N / bn, K / bk] float32
    topk_ids: torch.Tensor,  # [pairs]
    top_k: int,  # pairs a row of `a` serves (GEMM 1: the router's top_k; GEMM 2: 1)
    gated: bool,
    block_shape: tuple[int, int] | None,  # (bn, bk) of `scale`; None: per output channel
    input_scale: torch.Tensor | None = None,  # [1] float32 static input scale
    weights: torch.Tensor | None = None,  # [pairs] float32: routing weights multiplied in (GEMM 2)
    block_n: int = 4,
    split_k: int = 1,
    num_warps: int = 2,
) -> torch.Tensor:  # [pairs, N] (gated: [pairs, N / 2]) in a's dtype
    pairs, (k, n) = topk_ids.shape[0], (a.shape[1], w.shape[1])
    vec = 16 // a.element_size()
    block_k = vec * 32 * num_warps  # x's layout kept (module docstring)
    out, partials, tiles, k_per_split, split_k = pair_buffers(
        a, pairs, n, k, gated, block_n, block_k, split_k
    )
    group_n, group_k = block_shape or (1, k)
    _moe_fp8_gemv_kernel[(pairs, tiles, split_k)](
        a, w, scale, input_scale if input_scale is not None else scale, out, partials, split_counters(a.device),
        topk_ids, weights if weights is not None else scale,
        pairs, n, k, k_per_split, group_n, group_k,
        a.stride(0), w.stride(0), w.stride(1), scale.stride(0), scale.stride(1), scale.stride(2), out.stride(0),
        TOP_K=top_k, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, BLOCKED=block_shape is not None,
        STATIC_INPUT=input_scale is not None, GATED=gated, ROUTED=weights is not None, VEC=vec,
        HW_CVT=hardware_fp8_conversion(a), num_warps=num_warps,
    )  # fmt: skip
    return out


def fused_moe_fp8_gemv(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [E, 2I, hidden] float8_e4m3fn
    w2: torch.Tensor,  # [E, hidden, I] float8_e4m3fn
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
    quant: Fp8ExpertScales,
    **launch: int,  # block_n / split_k / num_warps for both GEMMs (a sweep's overrides)
) -> torch.Tensor:  # [num_tokens, hidden]
    """fused_moe for FP8 experts at decode batches (fp8_gemv_applies): GEMM 1 with silu(gate) * up, GEMM 2
    times the routing weight, one row per pair, then each token's top_k rows summed in float32."""

    def gemm1(x: torch.Tensor, ids: torch.Tensor, top_k: int) -> torch.Tensor:
        return launch_moe_fp8_gemv(
            x, w13, quant.w13, ids, top_k, True, quant.block_shape, input_scale=quant.a13, **launch
        )

    def gemm2(act: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return launch_moe_fp8_gemv(
            act, w2, quant.w2, ids, 1, False, quant.block_shape, input_scale=quant.a2, weights=weights, **launch
        )  # fmt: skip

    return two_gemvs(hidden, topk_weights, topk_ids, gemm1, gemm2)
