"""Integer experts (W4A16 / W8A16, ops.moe_quant.IntExpertScales) at decode batches: the fused MoE as two
GEMVs, one program per (token, k) pair and output tile.

Why: at a few tokens the grouped GEMM (ops.triton.fused_moe: 16-row tl.dot tiles, codes reshaped into
the dot's operand layout) is bound by instructions, not bytes: on an H100 it ran Mixtral-8x7B's W4A16
experts at one token in 474 us, 0.14 of the 66 us the bytes need, and slower than bf16 experts (as the
dense W4A16 GEMM was at batch 1 before ops/triton/wna16_gemv.py). This is that GEMV's decoder applied to
an expert's words:
- a pair needs no sorting: its program reads the expert id from topk_ids, so no alignment runs; pairs
  that chose one expert read its tiles at about the same time (the grid's first axis is the pair), so
  the second read of a tile is an L2 hit;
- [BLOCK_K / pf, BLOCK_N] word tiles in the words' own layout; a code becomes a float with one LOP3
  into the mantissa of 256.0 or 16.0 (exact), x's element takes the code's power-of-two place, and the
  group's zero and scale apply once per tile: sum_k x_k (c_kn - z_n) s_n = s_n (sum_k x_k c_kn - z_n sum_k x_k)
  (wna16_gemv's module docstring has the bit-level argument);
- GEMM 1 ([gate; up], N = 2I): a tile holds BLOCK_N / 2 gate rows and the matching up rows, and stores
  silu(gate) * up; GEMM 2 (down) multiplies by the pair's routing weight; both split K over SPLIT_K
  programs whose partials the tile's last program sums (ops.triton.split_k, no second launch);
- act order (A_PERM, GEMM 1): x's element for stored column k is x[perm[e, k]], one index load a code.
The words may be stored either way round: [E, N, K / pf] as checkpoints pack them, or K-major ([E, K /
pf, N] storage seen through strides as [E, N, K / pf], engine.model.quantization.wna16_moe's layout after
loading), where a word row is read along N in whole sectors.

Measured on an H100 at a38b72f (loadtest/results/moe-int-gemv-h100-2026-12-06-a38b72f/, `moei`: one
W4A16 layer's op in CUDA graphs, group 128, K-major words), against the grouped GEMM on the checkpoint's
layout as it ran before: Mixtral-8x7B at one token 130.7 us against 485.0 (0.50 of the bytes floor;
bf16 experts take 262.4 us, `06d78af`), at 8 tokens 674.2 against 1,017.0; Qwen3-30B-A3B 31.7 against
103.6 (bf16: 45.2) and 92.4 against 202.7. Act order adds 9-12%.

Numerics: weights are not rounded to the activation dtype (the reference dequantizes, rounds and then
multiplies); products and sums are float32, outputs rounded once, so results agree with the reference
to the activation dtype's rounding. A K tile lies in one group (BLOCK_K divides the group size and K).
Spec: ops.reference.fused_moe (tests/ops/test_moe_wna16_gemv.py under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.env_flags import env_flag
from ops.moe_quant import IntExpertScales
from ops.triton.moe_gemv_common import column_tiles, pair_buffers, pair_program, two_gemvs
from ops.triton.paged_attention import _num_sms
from ops.triton.split_k import split_counters, store_column_tiles

MOE_GEMV_MAX_TOKENS = 8  # decode batches at most this large take the GEMV (fused_moe.py dispatches)
TARGET_PROGRAMS_PER_SM = 4  # split K until pairs x tiles x splits reaches this many programs an SM


@triton.jit
def _x_at(a_row_ptr, perm_row_ptr, kk, A_PERM: tl.constexpr):
    """[WORDS] float32: the pair's activations at input columns kk (act order: at perm[kk])."""
    if A_PERM:
        kk = tl.load(perm_row_ptr + kk)
    return tl.load(a_row_ptr + kk).to(tl.float32)


@triton.jit
def _word_tile(word_ptrs, k0, stride_wk, mask_n, PACK: tl.constexpr, EVEN_N: tl.constexpr):
    """[WORDS, BLOCK_N] uint32: the words of the K tile that starts at k0."""
    if EVEN_N:
        words = tl.load(word_ptrs + (k0 // PACK) * stride_wk)
    else:
        words = tl.load(word_ptrs + (k0 // PACK) * stride_wk, mask=mask_n[None, :], other=0)
    return words.to(tl.uint32, bitcast=True)


@triton.jit
def _moe_wna16_gemv_kernel(
    a_ptr,  # [rows, K]: GEMM 1 the tokens' hidden states (row = pair // TOP_K), GEMM 2 [pairs, K]
    w_ptr,  # [E, N, K / pf] int32 words (any strides)
    scales_ptr,  # [E, N, G] float32
    zeros_ptr,  # [E, N, G] float32
    out_ptr,  # [pairs, N] (GATED: [pairs, N / 2]) in a's dtype
    partials_ptr,  # [SPLIT_K, pairs, N or tiles x BLOCK_N] float32
    counters_ptr,  # [tiles] int32 split-K tickets
    topk_ids_ptr,  # [pairs] each pair's expert
    weights_ptr,  # [pairs] float32 routing weights (ROUTED)
    perm_ptr,  # [E, K] int32 (A_PERM)
    num_pairs,
    N,  # the weight's rows (GATED: gate and up)
    K,
    k_per_split,
    mask_lo,  # 0x00078000 (8-bit codes: 0x007F8000), in a register rather than re-made before each LOP3
    mask_hi,  # 0x00780000
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sg,
    stride_ze,
    stride_zn,
    stride_zg,
    stride_pe,
    stride_om,
    TOP_K: tl.constexpr,  # pairs a row of a serves (GEMM 1: top_k; GEMM 2: 1)
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # every tile's columns exist: no mask on the words
    GATED: tl.constexpr,
    ROUTED: tl.constexpr,
    A_PERM: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK
    pair, pid_n, pid_k, tile, half_n, offs_n, mask_n, expert = pair_program(topk_ids_ptr, N, BLOCK_N, GATED)
    offs_w = tl.arange(0, WORDS)
    word_ptrs = w_ptr + expert * stride_we + offs_w[:, None] * stride_wk + offs_n[None, :] * stride_wn
    scale_ptrs = scales_ptr + expert * stride_se + offs_n * stride_sn
    zero_ptrs = zeros_ptr + expert * stride_ze + offs_n * stride_zn
    a_row_ptr = a_ptr + (pair // TOP_K) * stride_am
    perm_row_ptr = perm_ptr + expert * stride_pe
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)  # scaled, zero-corrected sums per word row
    for k0 in range(k_start, k_end, BLOCK_K):
        words = _word_tile(word_ptrs, k0, stride_wk, mask_n, PACK, EVEN_N)
        g = k0 // GROUP_SIZE
        scale = tl.load(scale_ptrs + g * stride_sg, mask=mask_n, other=0.0)[None, :]
        zero = tl.load(zero_ptrs + g * stride_zg, mask=mask_n, other=0.0)[None, :]
        dot = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)  # sum_k x_k (magic_k + c_kn) per word row
        lo = tl.zeros((WORDS,), dtype=tl.float32)  # sum of x over codes decoded as 256 + c
        hi = tl.zeros((WORDS,), dtype=tl.float32)  # sum of x over codes decoded as 16 + c (4-bit)
        kk = k0 + offs_w * PACK  # [WORDS]: each word's first input column
        for b in tl.static_range(4):  # byte b of each word: one 8-bit code or two 4-bit codes
            # byte b to mantissa bits 15-22, then an exponent OR-ed in: bits 15-18 read as 256 + c,
            # bits 19-22 as 16 + c (exact; 256 and 16 come off per group below)
            if b < 2:
                byte = words << (15 - 8 * b)
            else:
                byte = words >> (8 * b - 15)
            code_lo = ((byte & mask_lo) | 0x43800000).to(tl.float32, bitcast=True)
            if BITS == 8:
                at = b
            else:
                at = 2 * b
            x_lo = _x_at(a_row_ptr, perm_row_ptr, kk + at, A_PERM)
            dot += code_lo * x_lo[:, None]
            lo += x_lo
            if BITS == 4:
                code_hi = ((byte & mask_hi) | 0x41800000).to(tl.float32, bitcast=True)
                x_hi = _x_at(a_row_ptr, perm_row_ptr, kk + at + 1, A_PERM)
                dot += code_hi * x_hi[:, None]
                hi += x_hi
        acc += (dot - lo[:, None] * (zero + 256.0) - hi[:, None] * (zero + 16.0)) * scale
    if ROUTED:
        acc *= tl.load(weights_ptr + pair)
    store_column_tiles(acc, acc, acc, acc, out_ptr, partials_ptr, counters_ptr, tile, pair, num_pairs, N,
                       half_n, offs_n, pid_n, stride_om, pid_k, 1, SPLIT_K, BLOCK_N, GATED)  # fmt: skip


def default_block_n(num_tokens: int) -> int:
    """Output columns a program takes. H100 at a38b72f (moei, K-major words, one layer's op in CUDA graphs):
    at one token 128 columns beat 64 at both shapes (Mixtral-8x7B 123.5 against 130.7 us, Qwen3-30B-A3B
    28.5 against 31.7); at 8 tokens 64 (Qwen3 92.4 against 103.4 us; Mixtral 674 against 658)."""
    return 128 if num_tokens == 1 else 64


def gemv_block_k(k: int, group_k: int, bits: int, block_k: int = 128) -> int | None:
    """The deepest K tile up to `block_k` (a power of two, whole words) that divides both K and the group;
    None where there is none (the grouped GEMM serves such experts)."""
    pack = 32 // bits
    while block_k >= pack:
        if k % block_k == 0 and group_k % block_k == 0:
            return block_k
        block_k //= 2
    return None


def gemv_applies(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, quant: IntExpertScales) -> bool:
    """Whether fused_moe runs these experts for `hidden` as the GEMVs: WEIR_MOE_INT_GEMV on, a decode
    batch, and a K tile that lies in one group in both GEMMs (else the grouped GEMM)."""
    if not env_flag("WEIR_MOE_INT_GEMV") or hidden.shape[0] > MOE_GEMV_MAX_TOKENS or quant.bits not in (4, 8):
        return False
    k13, k2 = hidden.shape[1], w2.shape[2] * (32 // quant.bits)
    return (
        gemv_block_k(k13, k13 // quant.w13_scales.shape[2], quant.bits) is not None
        and gemv_block_k(k2, k2 // quant.w2_scales.shape[2], quant.bits) is not None
    )


def launch_moe_wna16_gemv(
    a: torch.Tensor,  # [rows, K]
    w: torch.Tensor,  # [E, N, K / pf] int32
    scales: torch.Tensor,  # [E, N, G] float32
    zeros: torch.Tensor,  # [E, N, G] float32
    topk_ids: torch.Tensor,  # [pairs]
    bits: int,
    top_k: int,  # pairs a row of `a` serves (GEMM 1: the router's top_k; GEMM 2: 1)
    gated: bool,
    weights: torch.Tensor | None = None,  # [pairs] float32: routing weights multiplied in (GEMM 2)
    perm: torch.Tensor | None = None,  # [E, K] int32: act order's input columns (GEMM 1)
    block_n: int = 64,
    block_k: int | None = None,  # None: the deepest up to 128 that divides K and the group
    split_k: int | None = None,  # None: enough splits for TARGET_PROGRAMS_PER_SM programs an SM
    num_warps: int = 4,
) -> torch.Tensor:  # [pairs, N] (gated: [pairs, N / 2]) in a's dtype
    pairs, (k, n) = topk_ids.shape[0], (a.shape[1], w.shape[1])
    group_k = k // scales.shape[2]
    block_k = block_k or gemv_block_k(k, group_k, bits)
    if block_k is None or k % block_k or group_k % block_k:
        raise ValueError(f"moe_wna16_gemv: no K tile divides K {k} and its group {group_k}")
    if split_k is None:
        wanted = _num_sms(a.device.index if a.is_cuda else -1) * TARGET_PROGRAMS_PER_SM
        split_k = max(1, min(k // block_k, wanted // (pairs * column_tiles(n, gated, block_n))))
    out, partials, tiles, k_per_split, split_k = pair_buffers(
        a, pairs, n, k, gated, block_n, block_k, split_k
    )
    perm_arg = perm if perm is not None else topk_ids
    _moe_wna16_gemv_kernel[(pairs, tiles, split_k)](
        a, w, scales, zeros, out, partials, split_counters(a.device), topk_ids,
        weights if weights is not None else scales, perm_arg,
        pairs, n, k, k_per_split, 0x007F8000 if bits == 8 else 0x00078000, 0x00780000,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), scales.stride(0), scales.stride(1), scales.stride(2),
        zeros.stride(0), zeros.stride(1), zeros.stride(2), perm_arg.stride(0), out.stride(0),
        TOP_K=top_k, BITS=bits, GROUP_SIZE=group_k, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_N=(n // 2) % (block_n // 2) == 0 if gated else n % block_n == 0, GATED=gated,
        ROUTED=weights is not None, A_PERM=perm is not None, num_warps=num_warps,
    )  # fmt: skip
    return out


def fused_moe_wna16_gemv(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [E, 2I, hidden / pf] int32
    w2: torch.Tensor,  # [E, hidden, I / pf] int32
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
    quant: IntExpertScales,
    **launch: int,  # block_n / block_k / split_k / num_warps for both GEMMs (a sweep's overrides)
) -> torch.Tensor:  # [num_tokens, hidden]
    """fused_moe for integer experts at decode batches (gemv_applies): GEMM 1 with silu(gate) * up, GEMM 2
    times the routing weight, one row per pair, then each token's top_k rows summed in float32."""
    launch = {"block_n": default_block_n(topk_ids.shape[0]), **launch}

    def gemm1(x: torch.Tensor, ids: torch.Tensor, top_k: int) -> torch.Tensor:
        return launch_moe_wna16_gemv(
            x, w13, quant.w13_scales, quant.w13_zeros, ids, quant.bits, top_k, gated=True, perm=quant.w13_perm,
            **launch,
        )  # fmt: skip

    def gemm2(act: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return launch_moe_wna16_gemv(
            act, w2, quant.w2_scales, quant.w2_zeros, ids, quant.bits, 1, gated=False, weights=weights, **launch
        )  # fmt: skip

    return two_gemvs(hidden, topk_weights, topk_ids, gemm1, gemm2)
