"""W4A16 / W8A16 GEMV for decode-sized batches (1-4 tokens), on the layout of wna16_gemm.py:
`qweight` int32 [K / pf, N] (pf = 32 // bits codes per word along K, lowest bits first), `scales` and
`zeros` [G, N] with groups contiguous along K; w[k, n] = (code[k, n] - zero[g, n]) * scale[g, n].

Why a separate kernel: at batch 1 the fused GEMM (a 16-row tl.dot tile, codes reshaped into the dot's
operand layout, an int-to-float conversion per weight, a second launch to sum split-K partials) ran at
0.13-0.19 of the copy bandwidth on an H200. Here there is no dot and no reshape:
- each program owns BLOCK_N output columns and a K range (all of K, or 1 / SPLIT_K of it), and streams
  [BLOCK_K / pf, BLOCK_N] tiles of words, coalesced along N;
- a code becomes a float32 without a conversion instruction (those run at a fraction of the FMA
  rate): OR-ing it into the mantissa of 2**23 and subtracting 2**23 is exact for codes below 2**23;
- the pf codes of a word meet x's elements k, k + 1, ... one at a time as [BLOCK_K / pf, BLOCK_N]
  planes multiplied into a 3-D accumulator, so nothing is reduced across threads inside the loop;
- the zero point and scale apply once per group, not per weight: sum_k x_k (c_kn - z_n) s_n =
  s_n (sum_k x_k c_kn - z_n sum_k x_k), keeping per row of the tile the code dot and the sum of x;
- the K splits' partials are summed by the last program of each tile (ops.triton.split_k), so a layer
  is one launch.
A tile lies in one group: BLOCK_K divides group_size (the planner, engine.model.quantization.wna16,
ensures it). The spec is engine.model.quantization.common.dequantize + F.linear
(tests/ops/test_wna16_gemv.py, under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.split_k import MAX_TILES, split_counters, store_split_k

MAX_GEMV_TOKENS = 4  # above this the per-weight math of each extra row makes the dot kernel better


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
    group_size,
    k_per_split,  # K rows per split, a multiple of BLOCK_K
    stride_xm,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_om,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    WORDS: tl.constexpr = BLOCK_K // PACK  # word rows per tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, WORDS, BLOCK_N), dtype=tl.float32)  # scaled, zero-corrected sums
    for k0 in range(k_start, k_end, BLOCK_K):
        word_rows = k0 // PACK + offs_w  # [WORDS]
        words = tl.load(
            qweight_ptr + word_rows[:, None] * stride_qk + offs_n[None, :],
            mask=(word_rows < k_end // PACK)[:, None] & mask_n[None, :],
            other=0,
        )  # [WORDS, BLOCK_N] int32
        code_dot = tl.zeros((BLOCK_M, WORDS, BLOCK_N), dtype=tl.float32)  # sum_k x_k c_kn per word row
        x_sum = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)  # sum_k x_k per word row
        for j in tl.static_range(PACK):
            bits = ((words >> (j * BITS)) & MASK) | 0x4B000000  # the code in 2**23's mantissa
            code = bits.to(tl.float32, bitcast=True) - 8388608.0  # [WORDS, BLOCK_N], exact
            kk = (k0 + j) + offs_w * PACK  # [WORDS]: the K index of code j of each word row
            xj = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                mask=mask_m[:, None] & (kk < k_end)[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_M, WORDS]
            code_dot += xj[:, :, None] * code[None, :, :]
            x_sum += xj
        g = k0 // group_size
        scale = tl.load(scales_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * stride_zg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += (code_dot - x_sum[:, :, None] * zero[None, None, :]) * scale[None, None, :]
    store_split_k(
        tl.sum(acc, axis=1), out_ptr, partials_ptr, counters_ptr, offs_m, offs_n, M, N, stride_om,
        pid_n, pid_k, SPLIT_K,
    )  # fmt: skip


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
) -> torch.Tensor:  # [M, N] in x.dtype
    """y = x w with w dequantized in registers, one launch. block_k must divide group_size and be a
    multiple of 32 // bits; split_k > 1 splits K over that many programs per BLOCK_N columns."""
    M, K = x.shape
    N = qweight.shape[1]
    pack = 32 // bits
    if not 1 <= M <= MAX_GEMV_TOKENS:
        raise ValueError(f"wna16_gemv takes 1 to {MAX_GEMV_TOKENS} rows; got {M}")
    if qweight.shape[0] * pack != K:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not pack K={K} at {bits} bits")
    if K % group_size or scales.shape != (K // group_size, N) or zeros.shape != scales.shape:
        raise ValueError(
            f"scales/zeros {tuple(scales.shape)} do not match K={K}, N={N}, group_size={group_size}"
        )
    if group_size % block_k or block_k % pack:
        raise ValueError(f"block_k {block_k} must divide group_size {group_size} and be a multiple of {pack}")
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(
            "wna16_gemv: qweight, scales, zeros and x must be contiguous along their last dimension"
        )
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    tiles = triton.cdiv(N, block_n)
    if split_k > 1 and tiles > MAX_TILES:
        raise ValueError(f"wna16_gemv: {tiles} column tiles exceed the split-K workspace ({MAX_TILES})")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    partials = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if split_k > 1 else out
    _wna16_gemv_kernel[(tiles, split_k)](
        x, qweight, scales, zeros, out, partials, split_counters(x.device),
        M, N, K, group_size, k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BITS=bits, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
