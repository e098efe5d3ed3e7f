"""What the MoE decode GEMVs (ops/triton/moe_wna16_gemv.py for integer experts, moe_fp8_gemv.py for FP8
ones) share: a program per (token, expert) pair, output tile and K split, its place in the grid
(`pair_program`), the output and split-K buffers of a launch (`pair_buffers`), and the two GEMMs of the
MoE MLP with each token's top_k rows summed (`two_gemvs`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ops.triton.split_k import MAX_TILES, gated_rows, k_splits


@triton.jit
def pair_program(topk_ids_ptr, N, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """(pair, pid_n, pid_k, tile: its split-K counter, half_n, offs_n [BLOCK_N] weight rows, mask_n,
    expert). GATED: a tile holds BLOCK_N / 2 gate rows and the matching up rows (N = 2 x half_n), so one
    program sees a column's gate and up sums. Pairs are the grid's first axis: pairs that chose one expert
    read its tiles at about the same time, the second read an L2 hit."""
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    tile = pair * tl.num_programs(1) + pid_n
    half_n = N // 2
    if GATED:
        offs_n, mask_n = gated_rows(pid_n, half_n, BLOCK_N)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    return pair, pid_n, pid_k, tile, half_n, offs_n, mask_n, expert


def column_tiles(n: int, gated: bool, block_n: int) -> int:
    """Output tiles a pair's launch has: N / BLOCK_N, or for a [gate; up] weight (N = 2 x half) half / (BLOCK_N / 2)."""
    return triton.cdiv(n // 2, block_n // 2) if gated else triton.cdiv(n, block_n)


def pair_buffers(
    a: torch.Tensor, pairs: int, n: int, k: int, gated: bool, block_n: int, block_k: int, split_k: int
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(out [pairs, N or N / 2] in a's dtype, partials [split_k, pairs, ...] float32 or out, column tiles,
    K per split, splits) of a launch; K left whole where the tiles would overflow the split-K workspace."""
    out_n = n // 2 if gated else n
    tiles = column_tiles(n, gated, block_n)
    k_per_split, split_k = k_splits(k, split_k, block_k)
    if split_k > 1 and pairs * tiles > MAX_TILES:
        split_k, k_per_split = 1, k
    out = torch.empty(pairs, out_n, dtype=a.dtype, device=a.device)
    partial_n = tiles * block_n if gated else n  # a gated tile's partials at its virtual columns
    partials = (
        torch.empty(split_k, pairs, partial_n, dtype=torch.float32, device=a.device) if split_k > 1 else out
    )
    return out, partials, tiles, k_per_split, split_k


def two_gemvs(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
    gemm1: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],  # (x, ids, top_k) -> [pairs, I]
    gemm2: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
    ],  # (act, ids, weights) -> [pairs, H]
) -> torch.Tensor:  # [num_tokens, hidden]
    """GEMM 1 (silu(gate) * up, a row per pair), GEMM 2 (times each pair's routing weight), then each
    token's top_k rows summed in float32 and rounded once."""
    num_tokens, top_k = topk_ids.shape
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    ids = topk_ids.reshape(-1)  # [pairs], pair = token * top_k + k
    act = gemm1(x, ids, top_k)
    down = gemm2(act, ids, topk_weights.reshape(-1).to(torch.float32))
    return down.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
