"""Batched LoRA in one launch for decode-sized batches, and the dispatch between it and the pair of
kernels (ops/triton/lora.py) that serves longer batches.

A decode step's LoRA work is tiny (rank 16: a few hundred KB of weights per layer), so the two
launches of the shrink/expand pair cost more than their work. The fused kernel does both halves in
one: a program owns a tile of output columns (a wide one, so there are few programs) and, for each
slot present among the tokens, computes the shrink of only the sub-matrix (or two, where the tile
straddles a boundary of a fused layer) that its columns meet, over the whole input dimension, rounds
it to B's dtype as PEFT does and multiplies it by its B tile. Every program recomputes that shrink
(rank x in_features of A, read from L2 after the first program's pass): cheap at a handful of tokens,
quadratic in waste for long batches, hence the threshold `FUSED_MAX_TOKENS`.

As in the pair: the per-token slot index is read by the kernel (-1: the row of y is left alone), the
grid depends on shapes only (CUDA graphs capture it with the index as a static input), every output
element is written by exactly one program (no atomics), ranks are zero-padded to max_lora_rank and a
fused layer's block-diagonal B is read on its diagonal blocks only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ops.triton.lora import _block_k, _dot_precision, lora_expand, lora_shrink

# Batches of at most this many tokens take the one-launch kernel (decode: CUDA-graph sizes 1-8).
# Each distinct adapter of the batch costs every program one pass over its A, so past a handful of
# tokens (and adapters) the pair, which splits that pass over many programs, wins again.
FUSED_MAX_TOKENS = 8


@triton.jit
def _lora_fused_kernel(
    x_ptr,  # [T, IN]
    a_ptr,  # [S, K, IN]: K = number of sub-matrices x SLICE_K
    b_ptr,  # [S, OUT, K]: block-diagonal over the sub-matrices of a fused layer
    slots_ptr,  # [T] int32
    y_ptr,  # [T, OUT], updated in place
    T,
    IN,
    SLICE_K,  # lora_dim of one sub-matrix
    N1,  # output row where sub-matrix 1 starts (OUT: there is none)
    N2,  # output row where sub-matrix 2 starts (OUT: there is none)
    OUT,
    stride_xm,
    stride_as,
    stride_ak,
    stride_bs,
    stride_bn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_IN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_slot = tl.load(slots_ptr + offs_m, mask=offs_m < T, other=-1)
    lo = tl.min(tl.where(tok_slot >= 0, tok_slot, 1 << 30), axis=0)  # none: an empty range below
    hi = tl.max(tok_slot, axis=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < OUT
    # The sub-matrices this output tile meets (one unless it straddles a boundary): only their A rows
    # enter the shrink, only their diagonal blocks of B are read.
    n_first = pid_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, OUT) - 1
    sub_lo = (n_first >= N1).to(tl.int32) + (n_first >= N2).to(tl.int32)
    sub_hi = (n_last >= N1).to(tl.int32) + (n_last >= N2).to(tl.int32)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < SLICE_K
    for slot in range(lo, hi + 1):
        match = tok_slot == slot
        if tl.sum(match.to(tl.int32), axis=0) > 0:
            delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sub in range(sub_lo, sub_hi + 1):
                k = sub * SLICE_K + offs_k
                # shrink: this sub-matrix's x @ A^T over the whole input, accumulated in fp32
                t = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
                for i0 in range(0, IN, BLOCK_IN):
                    offs_i = i0 + tl.arange(0, BLOCK_IN)
                    i_mask = offs_i < IN
                    x = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + offs_i[None, :],
                        mask=match[:, None] & i_mask[None, :],
                        other=0.0,
                    )
                    a = tl.load(
                        a_ptr + slot * stride_as + k[None, :] * stride_ak + offs_i[:, None],
                        mask=k_mask[None, :] & i_mask[:, None],
                        other=0.0,
                    )  # [BLOCK_IN, BLOCK_K]: A^T's tile
                    t += tl.dot(x, a.to(x.dtype), input_precision=DOT_PRECISION)
                # this sub-matrix's rows of the tile (all of them unless the tile straddles two)
                row_lo = tl.where(sub == 0, 0, tl.where(sub == 1, N1, N2))
                row_hi = tl.where(sub == 0, N1, tl.where(sub == 1, N2, OUT))
                rows = n_mask & (offs_n >= row_lo) & (offs_n < row_hi)
                b = tl.load(
                    b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + k[:, None],
                    mask=k_mask[:, None] & rows[None, :],
                    other=0.0,
                )  # [BLOCK_K, BLOCK_N]: B^T's tile
                # Round the shrink's output to B's dtype (PEFT feeds lora_A's output, in the model
                # dtype, to lora_B).
                delta += tl.dot(t.to(b.dtype), b, input_precision=DOT_PRECISION)
            y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
            y_mask = match[:, None] & n_mask[None, :]
            y = tl.load(y_ptrs, mask=y_mask, other=0.0)
            tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=y_mask)


def _check(
    name: str,
    x: torch.Tensor,
    a_stacked: torch.Tensor,
    b_stacked: torch.Tensor,
    token_slots: torch.Tensor,
    y: torch.Tensor,
    slice_offsets: Sequence[int],
) -> None:
    num_tokens, in_features = x.shape
    _, lora_dim, a_in = a_stacked.shape
    _, out_features, b_k = b_stacked.shape
    if (
        a_in != in_features
        or b_k != lora_dim
        or a_stacked.shape[0] != b_stacked.shape[0]
        or y.shape != (num_tokens, out_features)
        or token_slots.shape[0] != num_tokens
    ):
        raise ValueError(
            f"{name}: x {tuple(x.shape)}, A {tuple(a_stacked.shape)}, B {tuple(b_stacked.shape)}, "
            f"y {tuple(y.shape)}, slots {tuple(token_slots.shape)}"
        )
    num_subs = len(slice_offsets)
    if not 1 <= num_subs <= 3 or lora_dim % num_subs or slice_offsets[0] != 0:
        raise ValueError(f"{name}: slice_offsets {tuple(slice_offsets)} for lora_dim {lora_dim}")
    if y.stride(1) != 1:
        raise ValueError(f"{name}: y must be contiguous along its last dimension")


def lora_fused(
    x: torch.Tensor,  # [num_tokens, in_features]
    a_stacked: torch.Tensor,  # [num_slots, lora_dim, in_features]
    b_stacked: torch.Tensor,  # [num_slots, out_features, lora_dim]
    token_slots: torch.Tensor,  # [num_tokens] int32; -1 = no adapter
    y: torch.Tensor,  # [num_tokens, out_features], updated in place
    slice_offsets: Sequence[int] = (0,),  # output row where each sub-matrix of a fused layer starts
) -> torch.Tensor:
    """y += (x @ A[slot]^T, rounded to B's dtype) @ B[slot]^T per token in ONE launch; returns y
    (ops.reference.lora_apply). Correct for any batch, fast for decode-sized ones (FUSED_MAX_TOKENS):
    every program recomputes the shrink of the sub-matrices its output tile meets."""
    _check("lora_fused", x, a_stacked, b_stacked, token_slots, y, slice_offsets)
    num_tokens, in_features = x.shape
    out_features, lora_dim = b_stacked.shape[1:]
    if num_tokens == 0:
        return y
    x = x.contiguous()
    slice_k = lora_dim // len(slice_offsets)
    bounds = [*slice_offsets[1:], out_features, out_features][:2]  # N1, N2
    block_k = _block_k(slice_k)
    # Wide output tiles (few programs, so little redundant shrink) and long strides through A, as far
    # as registers allow: sizes without spills for bf16 on sm_90 (ptxas), ranks 16 / 32 / 64.
    block_m = 16  # a decode batch in one token tile
    block_n = 128 if block_k <= 32 else 64
    block_in = {16: 256, 32: 128}.get(block_k, 32)
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, block_n))
    fp32 = torch.float32 in (x.dtype, b_stacked.dtype)
    _lora_fused_kernel[grid](
        x,
        a_stacked,
        b_stacked,
        token_slots,
        y,
        num_tokens,
        in_features,
        slice_k,
        bounds[0],
        bounds[1],
        out_features,
        x.stride(0),
        a_stacked.stride(0),
        a_stacked.stride(1),
        b_stacked.stride(0),
        b_stacked.stride(1),
        y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_IN=block_in,
        DOT_PRECISION=_dot_precision(torch.float32 if fp32 else x.dtype),
    )
    return y


def lora_apply(
    x: torch.Tensor,  # [num_tokens, in_features]
    a_stacked: torch.Tensor,  # [num_slots, lora_dim, in_features]
    b_stacked: torch.Tensor,  # [num_slots, out_features, lora_dim]
    token_slots: torch.Tensor,  # [num_tokens] int32; -1 = no adapter
    y: torch.Tensor,  # [num_tokens, out_features], updated in place
    slice_offsets: Sequence[int] = (0,),
) -> torch.Tensor:
    """A LoRA layer's term, y += x @ A[slot]^T @ B[slot]^T per token (ops.reference.lora_apply): one
    launch for at most FUSED_MAX_TOKENS tokens, the shrink/expand pair for longer batches. The choice
    depends on the token count only, so a CUDA graph of a given size captures one path."""
    if x.shape[0] <= FUSED_MAX_TOKENS:
        return lora_fused(x, a_stacked, b_stacked, token_slots, y, slice_offsets)
    t = lora_shrink(x, a_stacked, token_slots)  # fp32 [split, num_tokens, lora_dim]
    return lora_expand(t, b_stacked, token_slots, y, slice_offsets)
