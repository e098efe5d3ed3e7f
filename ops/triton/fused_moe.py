"""The mixture-of-experts MLP as two grouped GEMMs (same signature as ops.reference.fused_moe).

Each (token, k) pair is routed to one expert. `moe_align_block_size` sorts the pairs by expert and pads
each expert's run to a multiple of BLOCK_M, so that a block of BLOCK_M sorted pairs belongs to one
expert: a program then multiplies BLOCK_M rows by one tile of that expert's weights, read once for the
whole block (a grouped GEMM), and experts that got no pair get no block at all.

- GEMM 1 (GATED): rows of x (pair // top_k) times the expert's [gate; up], both halves of an output
  tile in one program, so silu(gate) * up is computed in the epilogue: [num_pairs, intermediate].
- GEMM 2: those rows times the expert's down projection, the pair's routing weight applied in the
  epilogue: [num_pairs, hidden]. The top_k rows of each token are then summed (float32).

FP8 experts (W8A16; ops.moe_quant.Fp8ExpertScales) are a compile-time variant (W_FP8), so the float
kernel is unchanged: each fp8 weight tile is converted in registers to the activation dtype times its
scales (per output channel: loaded once per program; per block: gathered per tile) before the same
tl.dot, as the reference dequantizes before its float GEMMs. A static input scale (A_QDQ) passes each
input tile through fp8 and back (fp8(a / s) * s), what an FP8 GEMM would read. (A W8A8 variant with an
fp8 tl.dot on quantized activations is left for later.) Integer experts (W4A16 / W8A16;
ops.moe_quant.IntExpertScales) are another (W_BITS): the dense W4A16 GEMM's tile decoder
(ops.triton.wna16_gemm._dequant_tile, the expert's [N, K / pf] words seen through strides as its
[K / pf, N]) reads each int32 word once, shifts its codes out in registers and applies the group's zero
and scale (one row of them a tile where a K tile lies in one group), rounded to the activation dtype.
The engine stores those words K-major (engine.model.quantization.wna16_moe.store_k_major: [K / pf, N]
storage, as the dense GEMM's), so a tile's rows are whole sectors: on an H100 at a38b72f that took a
64-token W4A16 layer from 1,752 to 1,012 us at Mixtral-8x7B's shape and from 509 to 325 us at
Qwen3-30B-A3B's. At decode batches integer experts take two GEMVs instead (gemv_applies,
ops/triton/moe_wna16_gemv.py), and so do FP8 experts (ops/triton/moe_fp8_gemv.py). With act order (A_PERM: GPTQ desc_act, compressed-tensors actorder "group") an expert's w13 columns are stored in group order and GEMM 1
gathers x's columns through the expert's permutation (a [BLOCK_K] index load per K tile).

No shape depends on the routing: the padded length is num_pairs + num_experts * (BLOCK_M - 1) rounded
up to BLOCK_M (the most any routing can need), every buffer is sized by the number of tokens, the
sorting is torch ops without host syncs (or one Triton launch, ops/triton/moe_align.py, on a GPU at
decode-sized batches), and programs past the used length return at once. So a step of a given size
launches the same grid whatever its tokens chose, and CUDA graphs can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.env_flags import env_flag
from ops.moe_quant import Fp8ExpertScales, IntExpertScales
from ops.triton.fp8_quant import _to_fp8, hardware_fp8_conversion
from ops.triton.moe_align import moe_align_block_size_kernel
from ops.triton.moe_fp8_gemv import fp8_gemv_applies, fused_moe_fp8_gemv
from ops.triton.moe_wna16_gemv import fused_moe_wna16_gemv, gemv_applies
from ops.triton.wna16_gemm import _dequant_tile

# The most pairs (tokens * top_k) aligned by the one-program kernel; past it the torch ops. Measured on an
# H100 at 9c4fe20 (loadtest/results/moe-align-h100-2026-12-05-9c4fe20/), each alone in a CUDA graph,
# kernel / torch ops: Qwen3-30B-A3B (128 experts) 5.3 / 46.5 us at 8 pairs, 52.8 / 76.8 at 1024, 98.8 /
# 78.4 at 2048; Mixtral-8x7B (8 experts) 2.0 / 46.8 at 2, 60.6 / 76.3 at 2048, 119.5 / 81.1 at 4096. The
# kernel is one program walking the pairs (its time grows with pairs and experts), the torch ops a
# fixed ~15 launches: 1024 is the largest measured size where the kernel wins at both shapes (decode
# batches to 128 tokens at Qwen3-MoE's top 8, 512 at Mixtral's top 2).
ALIGN_KERNEL_MAX_PAIRS = 1024


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [num_tokens, top_k] -> (sorted_pairs [padded] int32: pair indices (token * top_k + k)
    grouped by expert, each expert's run padded with num_pairs to a multiple of block_m; block_expert
    [padded / block_m] int32: the expert of each block; num_padded [1] int32: the used length).

    Sizes depend only on topk_ids' shape; the values are computed on the device without a sync.
    """
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    padded = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    flat = topk_ids.reshape(-1).to(torch.int64)  # [num_pairs]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [num_experts]: no bincount (it syncs)
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded_counts, 0)  # [num_experts]
    padded_start = padded_end - padded_counts
    unpadded_start = torch.cumsum(counts, 0) - counts
    sorted_experts, order = torch.sort(flat, stable=True)  # order: pair indices grouped by expert
    rank = torch.arange(num_pairs, device=device) - unpadded_start[sorted_experts]  # place in its run
    sorted_pairs = torch.full((padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, padded_start[sorted_experts] + rank, order.to(torch.int32))
    block_starts = torch.arange(0, padded, block_m, device=device)  # [padded / block_m]
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pairs, block_expert.to(torch.int32), padded_end[-1:].to(torch.int32)


def align_kernel_applies(topk_ids: torch.Tensor) -> bool:
    """Whether fused_moe aligns these pairs with the one-launch kernel: on a GPU, up to
    ALIGN_KERNEL_MAX_PAIRS pairs, WEIR_MOE_ALIGN_KERNEL on (the CPU keeps the torch ops, the spec)."""
    return (
        topk_ids.is_cuda and topk_ids.numel() <= ALIGN_KERNEL_MAX_PAIRS and env_flag("WEIR_MOE_ALIGN_KERNEL")
    )


def align_pairs(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align_block_size's result, by the kernel where it applies, else by the torch ops."""
    if align_kernel_applies(topk_ids):
        return moe_align_block_size_kernel(topk_ids, num_experts, block_m)
    return moe_align_block_size(topk_ids, num_experts, block_m)


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # GATED: x [num_tokens, K]; else the activations [num_pairs, K]
    w_ptr,  # GATED: w13 [E, 2 * N, K]; else w2 [E, N, K]
    out_ptr,  # [num_pairs, N]
    weights_ptr,  # [num_pairs] float32 routing weights (not GATED)
    sorted_pairs_ptr,  # [padded] int32
    block_expert_ptr,  # [padded / BLOCK_M] int32
    num_padded_ptr,  # [1] int32
    N,
    K,
    num_pairs,
    top_k,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    scale_ptr,  # W_FP8: [E, N_s, K_s] float32 weight scales (per channel: [E, N, 1])
    stride_se,
    stride_sn,
    stride_sk,
    group_n,  # weight rows per scale row (1 per channel)
    group_k,  # weight columns per scale column (BLOCKED only)
    a_scale_ptr,  # A_QDQ: [1] float32 static input scale
    zeros_ptr,  # W_BITS: [E, N, G] float32 zero points, laid out as the scales
    perm_ptr,  # A_PERM: [E, K] int32, the input column each of the expert's K columns reads
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,  # GEMM 1: both halves of w13, silu(gate) * up in the epilogue
    IEEE: tl.constexpr,  # float32 inputs: full-precision dot products (no TF32)
    W_FP8: tl.constexpr = False,  # float8_e4m3fn weights, dequantized per tile in registers
    BLOCKED: tl.constexpr = False,  # W_FP8 scales per [group_n, group_k] block; else per output channel
    A_QDQ: tl.constexpr = False,  # the input through fp8 with a static scale (W_FP8 only)
    HW_CVT: tl.constexpr = True,  # A_QDQ: the GPU's fp8 conversion; else in software (the interpreter)
    W_BITS: tl.constexpr = 0,  # 4 / 8: integer codes packed along K in int32 words, per-group scales / zeros
    A_PERM: tl.constexpr = False,  # act order: the expert's columns of a gathered through perm_ptr
    ONE_GROUP: tl.constexpr = False,  # W_BITS: each K tile lies in one group (group_k % BLOCK_K == 0)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the last expert's padded run: this step's routing needed fewer blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m)  # [BLOCK_M]
    valid = pairs < num_pairs  # padding slots hold num_pairs
    if GATED:
        rows = pairs // top_k  # a pair's token
    else:
        rows = pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_base = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    w_base = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    a_ty = a_ptr.dtype.element_ty
    if W_BITS > 0:  # the expert's words, scales and zeros: [N, K / pf] and [N, G] seen as wna16's [K, N]
        wq_base = w_ptr + expert * stride_we
        sq_base = scale_ptr + expert * stride_se
        zq_base = zeros_ptr + expert * stride_se
    if W_FP8:  # this tile's scale rows: gate (or w2) rows offs_n, up rows N + offs_n
        s_base = scale_ptr + expert * stride_se + (offs_n // group_n).to(tl.int64)[None, :] * stride_sn
        s_base_up = (
            scale_ptr + expert * stride_se + ((N + offs_n) // group_n).to(tl.int64)[None, :] * stride_sn
        )
        s_chan = 0.0  # BLOCKED: the tile's scales are gathered per K tile instead
        s_chan_up = 0.0
        if not BLOCKED:  # [1, BLOCK_N]: one scale per output channel, for every K tile
            s_chan = tl.load(s_base, mask=n_mask[None, :], other=0.0)
            if GATED:
                s_chan_up = tl.load(s_base_up, mask=n_mask[None, :], other=0.0)
    if A_QDQ:
        a_scale = tl.load(a_scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if A_PERM:  # [BLOCK_K] input columns of this K tile, in the expert's group order
            cols = tl.load(perm_ptr + expert * K + offs_k, mask=k_mask, other=0)
        else:
            cols = offs_k
        a = tl.load(a_base + cols[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        if A_QDQ:  # as the reference's fp8_qdq: fp8(a / s) * s in a's dtype
            a_q = _to_fp8(tl.math.div_rn(a.to(tl.float32), a_scale), HW_CVT)
            a = (a_q.to(tl.float32) * a_scale).to(a_ty)
        w_mask = k_mask[:, None] & n_mask[None, :]
        if W_BITS > 0:
            w = _dequant_tile(
                wq_base, sq_base, zq_base, k0, K, offs_n, n_mask, group_k,
                stride_wk, stride_wn, stride_sk, stride_sn, stride_sk, stride_sn,
                W_BITS, BLOCK_N, BLOCK_K, ONE_GROUP, False, False,
            ).to(a_ty)  # fmt: skip
        else:
            w = tl.load(w_base + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        if W_FP8:
            w = _dequantize_tile(w, s_base, offs_k, group_k, stride_sk, w_mask, s_chan, BLOCKED).to(a_ty)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        if GATED:  # the up half: rows N.. of the expert's w13
            if W_BITS > 0:  # rows N.. of the expert's words, scales and zeros
                w_up = _dequant_tile(
                    wq_base + N * stride_wn, sq_base + N * stride_sn, zq_base + N * stride_sn, k0, K, offs_n,
                    n_mask, group_k, stride_wk, stride_wn, stride_sk, stride_sn, stride_sk, stride_sn,
                    W_BITS, BLOCK_N, BLOCK_K, ONE_GROUP, False, False,
                ).to(a_ty)  # fmt: skip
            else:
                w_up = tl.load(w_base + N * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
            if W_FP8:
                w_up = _dequantize_tile(
                    w_up, s_base_up, offs_k, group_k, stride_sk, w_mask, s_chan_up, BLOCKED
                ).to(a_ty)
            if IEEE:
                acc_up += tl.dot(a, w_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, w_up)
    out_ty = out_ptr.dtype.element_ty
    if GATED:  # as silu_and_mul over [gate | up] rounded to the activation dtype
        gate = acc.to(out_ty).to(tl.float32)
        up = acc_up.to(out_ty).to(tl.float32)
        result = gate / (1.0 + tl.exp(-gate)) * up
    else:  # the down projection rounded, then times the pair's routing weight in float32
        weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
        result = acc.to(out_ty).to(tl.float32) * weight[:, None]
    out_offs = pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptr + out_offs, result.to(out_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _dequantize_tile(w, s_base, offs_k, group_k, stride_sk, w_mask, s_chan, BLOCKED: tl.constexpr):
    """[BLOCK_K, BLOCK_N] fp8 -> float32 w * scale (the caller rounds it once to the activation dtype, as
    the reference's dequantize_fp8_experts)."""
    if BLOCKED:
        s = tl.load(s_base + (offs_k // group_k).to(tl.int64)[:, None] * stride_sk, mask=w_mask, other=0.0)
    else:
        s = s_chan
    return w.to(tl.float32) * s


def default_block_m(num_tokens: int) -> int:
    # Decode batches: few pairs an expert, so small blocks waste little padding; prefill: bigger tiles.
    return 16 if num_tokens <= 64 else 64


DECODE_TILE_MAX_TOKENS = 8  # float and integer experts at this many tokens or fewer take DECODE_TILE


DECODE_TILE = (64, 128, 3)  # (BLOCK_N, BLOCK_K, num_stages) of a decode launch


def default_tile(
    n: int, k: int, num_tokens: int, decode_tile_applies: bool, group_k: int | None = None
) -> tuple[int, int, int | None]:
    """(BLOCK_N, BLOCK_K, num_stages) of a launch the caller leaves untuned; num_stages None: Triton's.

    At a few tokens an expert's GEMM only streams its weights: 128-deep K tiles three stages deep keep
    more bytes in flight per program. On an H100, at one token, they took float experts' two GEMMs from
    284 to 249 us at Mixtral-8x7B's shape and from 37.8 to 32.1 us at Qwen3-30B-A3B's (kernel_check_moe's
    sweeps at `9c4fe20` and `98de842`), and the W4A16 experts' whole op from 602 to 479 us and 124 to 102
    us (1 token) and 1,294 to 1,015 and 218 to 199 us (8 tokens; `moei` at `b01cf46`, the best of seven
    tiles or within 14%). At 64 tokens the float sweep found them no faster, so bigger batches keep
    64 x 64. FP8 experts were not timed with it: they keep 64 x 64 (decode_tile_applies False).

    Integer experts (`group_k`: the K columns a zero/scale row covers) take K tiles no deeper than a group,
    so that each tile reads one row of them (ONE_GROUP): a 128-deep tile across groups of 32 gathers a
    zero and a scale per code, and three stages of those gathers asked an H100 for 296-303 KB of shared
    memory (its limit is 227 KB; the feature check's group-32 MoE checkpoints at `a16eb5b`).
    """
    if decode_tile_applies and num_tokens <= DECODE_TILE_MAX_TOKENS:
        tile_n, tile_k, stages = DECODE_TILE
    else:
        tile_n, tile_k, stages = 64, 64, None
    if group_k is not None and 16 <= group_k < tile_k and group_k & (group_k - 1) == 0:
        tile_k = group_k
    return _fit(tile_n, n), _fit(tile_k, k), stages


def _fit(tile: int, size: int) -> int:
    """A tile side for a dimension of `size`: at most `tile`, at least 16, no wider than it needs."""
    return min(tile, max(16, triton.next_power_of_2(size)))


def launch_moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    top_k: int,
    block_m: int,
    gated: bool,
    scale: torch.Tensor | None = None,  # quantized w: [E, N_s, K_s] float32
    block_shape: tuple[int, int] | None = None,  # fp8 (bn, bk) of `scale`; None: per output channel
    a_scale: torch.Tensor | None = None,  # [1] float32 static input scale
    zeros: torch.Tensor | None = None,  # integer w: [E, N, G] float32, as `scale`
    bits: int = 0,  # integer w: [E, N, K / (32 // bits)] int32 words; 0: w is float or fp8
    a_perm: torch.Tensor | None = None,  # [E, K] int32: act order's input columns per expert (GEMM 1)
    block_n: int | None = None,  # tile overrides (loadtest/kernel_check_moe.py's sweep); None: the default
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> None:
    """One grouped GEMM of fused_moe (GEMM 1 when `gated`, else GEMM 2) into `out`."""
    sorted_pairs, block_expert, num_padded = align
    n, k = out.shape[1], a.shape[1]
    quantized = scale is not None
    if bits:
        group_n, group_k = 1, k // scale.shape[2]
    else:
        group_n, group_k = block_shape or (1, k)
    if block_n is None and block_k is None and num_stages is None:
        # out holds one row per (token, expert) pair in both GEMMs
        applies = a_scale is None and (not quantized or bits > 0)  # float or integer, not FP8 weights
        tokens = out.shape[0] // top_k
        block_n, block_k, num_stages = default_tile(n, k, tokens, applies, group_k if bits else None)
    else:  # a sweep's tile; a side it leaves out is the plain 64
        block_n = block_n or _fit(64, n)
        block_k = block_k or _fit(64, k)
    stages = {} if num_stages is None else {"num_stages": num_stages}
    grid = (block_expert.shape[0], triton.cdiv(n, block_n))
    s = scale if quantized else out  # unread unless W_FP8 or W_BITS
    _moe_gemm_kernel[grid](
        a, w, out, weights, sorted_pairs, block_expert, num_padded,
        n, k, out.shape[0], top_k,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        s, s.stride(0), s.stride(1), s.stride(2) if quantized else 0, group_n, group_k,
        a_scale if a_scale is not None else weights, zeros if zeros is not None else s,
        a_perm if a_perm is not None else sorted_pairs,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GATED=gated, IEEE=a.dtype == torch.float32,
        W_FP8=quantized and not bits, BLOCKED=block_shape is not None, A_QDQ=a_scale is not None,
        HW_CVT=hardware_fp8_conversion(a), W_BITS=bits, A_PERM=a_perm is not None,
        ONE_GROUP=bool(bits) and group_k % block_k == 0, num_warps=num_warps,
        **stages,
    )  # fmt: skip


def fused_moe(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int
    quant: Fp8ExpertScales | IntExpertScales | None = None,  # quantized w13 / w2 (ops.moe_quant)
) -> torch.Tensor:  # [num_tokens, hidden]
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, _ = w13.shape
    hidden_size = hidden.shape[1]  # (w13's last dim is packed for integer experts)
    if num_tokens == 0:
        return torch.empty(0, hidden_size, dtype=hidden.dtype, device=hidden.device)
    if isinstance(quant, IntExpertScales) and gemv_applies(hidden, w13, w2, quant):
        return fused_moe_wna16_gemv(hidden, w13, w2, topk_weights, topk_ids, quant)
    if isinstance(quant, Fp8ExpertScales) and fp8_gemv_applies(hidden, w13):
        return fused_moe_fp8_gemv(hidden, w13, w2, topk_weights, topk_ids, quant)
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    block_m = default_block_m(num_tokens)
    align = align_pairs(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    act = torch.empty(num_pairs, two_i // 2, dtype=hidden.dtype, device=hidden.device)  # [num_pairs, I]
    q13 = q2 = {}
    if isinstance(quant, IntExpertScales):
        q13 = {
            "scale": quant.w13_scales,
            "zeros": quant.w13_zeros,
            "bits": quant.bits,
            "a_perm": quant.w13_perm,
        }
        q2 = {"scale": quant.w2_scales, "zeros": quant.w2_zeros, "bits": quant.bits}
    elif quant is not None:
        q13 = {"scale": quant.w13, "block_shape": quant.block_shape, "a_scale": quant.a13}
        q2 = {"scale": quant.w2, "block_shape": quant.block_shape, "a_scale": quant.a2}
    launch_moe_gemm(x, w13, act, topk_weights, align, top_k, block_m, gated=True, **q13)
    down = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)  # [num_pairs, H]
    weights = topk_weights.reshape(-1).to(torch.float32)  # [num_pairs], pair = token * top_k + k
    launch_moe_gemm(act, w2, down, weights, align, top_k, block_m, gated=False, **q2)
    return down.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
