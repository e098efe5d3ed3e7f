"""The mixture-of-experts MLP as two grouped GEMMs (same signature as ops.reference.fused_moe).

Each (token, k) pair is routed to one expert. `moe_align_block_size` sorts the pairs by expert and pads
each expert's run to a multiple of BLOCK_M, so that a block of BLOCK_M sorted pairs belongs to one
expert: a program then multiplies BLOCK_M rows by one tile of that expert's weights, read once for the
whole block (a grouped GEMM), and experts that got no pair get no block at all.

- GEMM 1 (GATED): rows of x (pair // top_k) times the expert's [gate; up], both halves of an output
  tile in one program, so silu(gate) * up is computed in the epilogue: [num_pairs, intermediate].
- GEMM 2: those rows times the expert's down projection, the pair's routing weight applied in the
  epilogue: [num_pairs, hidden]. The top_k rows of each token are then summed (float32).

No shape depends on the routing: the padded length is num_pairs + num_experts * (BLOCK_M - 1) rounded
up to BLOCK_M (the most any routing can need), every buffer is sized by the number of tokens, the
sorting is torch ops without host syncs, and programs past the used length return at once. So a step
of a given size launches the same grid whatever its tokens chose, and CUDA graphs can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,  # GEMM 1: both halves of w13, silu(gate) * up in the epilogue
    IEEE: tl.constexpr,  # float32 inputs: full-precision dot products (no TF32)
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_base + offs_k[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w = tl.load(w_base + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        if GATED:  # the up half: rows N.. of the expert's w13
            w_up = tl.load(w_base + N * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
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


def _block_m(num_tokens: int) -> int:
    # Decode batches: few pairs an expert, so small blocks waste little padding; prefill: bigger tiles.
    return 16 if num_tokens <= 64 else 64


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    top_k: int,
    block_m: int,
    gated: bool,
) -> None:
    sorted_pairs, block_expert, num_padded = align
    n, k = out.shape[1], a.shape[1]
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (block_expert.shape[0], triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, w, out, weights, sorted_pairs, block_expert, num_padded,
        n, k, out.shape[0], top_k,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GATED=gated, IEEE=a.dtype == torch.float32,
        num_warps=4,
    )  # fmt: skip


def fused_moe(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int
) -> torch.Tensor:  # [num_tokens, hidden]
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden_size = w13.shape
    if num_tokens == 0:
        return torch.empty(0, hidden_size, dtype=hidden.dtype, device=hidden.device)
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    block_m = _block_m(num_tokens)
    align = moe_align_block_size(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    act = torch.empty(num_pairs, two_i // 2, dtype=hidden.dtype, device=hidden.device)  # [num_pairs, I]
    _launch(x, w13, act, topk_weights, align, top_k, block_m, gated=True)
    down = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)  # [num_pairs, H]
    weights = topk_weights.reshape(-1).to(torch.float32)  # [num_pairs], pair = token * top_k + k
    _launch(act, w2, down, weights, align, top_k, block_m, gated=False)
    return down.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
