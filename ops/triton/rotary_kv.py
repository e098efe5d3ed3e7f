"""Rotary embedding fused with the KV-cache write: one launch per layer where there were two.

At batch 1 an 8B model's decode step launches ~350 kernels; the rotary kernel (~2.2 us) and the KV
write (~1.5 us) are two of each layer's, and each costs more in launch, ramp and drain than in bytes
(H200 profile at 1679c33, `loadtest/results/suite-h200-2026-12-03-1679c33/`). Here one program per
token loads its cos/sin row once, writes the rotated query to a new tensor (as ops.triton.rotary
does: q is a view into the fused qkv buffer) and stores the rotated key and the value straight into
their cache slot (ops.triton.kv_cache's layout and fp8 rounding). The rotated key exists only in the
cache: paged attention reads keys from there.

The rotated key is rounded to the model dtype before it is stored or quantized, as the two separate
ops round it (rotary returns it in the model dtype), so the cache holds the same bytes either way.
The spec is ops.reference.rotary_and_write_kv (rotary_embedding, then write_kv_cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.kv_cache import _FP8_FORMATS, _NOT_FP8, _to_cache
from ops.triton.pdl import let_next_kernel_start, pdl_enabled, wait_for_previous_kernel
from ops.triton.rotary import _rotate_heads, _rotated_halves, _rows


@triton.jit
def _rotary_write_kv_kernel(
    q_out_ptr,  # [num_tokens, num_heads * head_dim]
    q_ptr,
    k_ptr,  # [num_tokens, num_kv_heads * head_dim]
    v_ptr,  # [num_tokens, num_kv_heads * head_dim]
    positions_ptr,  # [num_tokens]
    cos_sin_ptr,  # [max_position, head_dim]: cos | sin
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens] int64; -1: padding, nothing stored
    k_scale_ptr,  # [num_kv_heads] float32 (SCALED fp8 caches)
    v_scale_ptr,
    stride_q,
    stride_q_out,
    stride_k,
    stride_v,
    stride_cs,
    stride_kcb,
    stride_kcs,
    stride_vcb,
    stride_vcs,
    num_heads,
    num_kv_heads,
    block_size,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    FP8_MANT: tl.constexpr,  # 0: the cache is in the model's dtype; else its fp8 format's
    FP8_MIN_EXP: tl.constexpr,
    FP8_MAX: tl.constexpr,
    SCALED: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL, and lets the next kernel launch early (ops.triton.pdl)
):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + row).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d).to(tl.float32)[None, :]  # [1, HALF]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_d).to(tl.float32)[None, :]
    _rotate_heads(q_out_ptr, q_ptr, stride_q, stride_q_out, row, cos, sin, num_heads, HALF, BLOCK_H)
    slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
    if slot >= 0:
        # The cache rows of this slot: heads contiguous, each head_dim (= 2 * HALF) wide.
        kc = k_cache_ptr + slot // block_size * stride_kcb + slot % block_size * stride_kcs
        vc = v_cache_ptr + slot // block_size * stride_vcb + slot % block_size * stride_vcs
        offs_h = tl.arange(0, BLOCK_H)
        for h0 in range(0, num_kv_heads, BLOCK_H):
            heads = h0 + offs_h
            mask_h = heads < num_kv_heads
            mask = mask_h[:, None]
            idx = heads[:, None] * (2 * HALF) + offs_d[None, :]  # [BLOCK_H, HALF]
            # rounded to the model dtype, as the separate rotary op returns it
            r1, r2 = _rotated_halves(k_ptr + row * stride_k, idx, mask, cos, sin, HALF)
            r1 = _to_cache(r1, k_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
            r2 = _to_cache(r2, k_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
            tl.store(kc + idx, r1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(kc + idx + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            v1 = tl.load(v_ptr + row * stride_v + idx, mask=mask, other=0.0)
            v2 = tl.load(v_ptr + row * stride_v + idx + HALF, mask=mask, other=0.0)
            v1 = _to_cache(v1, v_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
            v2 = _to_cache(v2, v_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
            tl.store(vc + idx, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(vc + idx + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


# BLOCK_H per (head_dim, num_heads, num_kv_heads), stored once validated. Python ints only: valid for
# every batch size and across CUDA-graph capture and replay.
_BLOCK_H: dict[tuple[int, int, int], int] = {}


def _block_h(head_dim: int, num_heads: int, num_kv_heads: int) -> int:
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"rotary_and_write_kv needs a power-of-two head_dim; got {head_dim}")
    block_h = min(triton.next_power_of_2(max(num_heads, num_kv_heads)), max(1, 4096 // head_dim))
    _BLOCK_H[(head_dim, num_heads, num_kv_heads)] = block_h
    return block_h


def check_head_rows_cache(
    op: str, k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int
) -> None:
    """The cache layout the kernels that store a token's heads as one row address (head h at
    h * head_dim of the slot's row): [blocks, block_size, num_kv_heads, head_dim], contiguous in its
    last two dimensions, K and V alike."""
    kcs, vcs = k_cache.stride(), v_cache.stride()
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or kcs[-1] != 1 or kcs[-2] != head_dim or vcs != kcs:
        raise ValueError(
            f"{op}: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} must be contiguous "
            f"[blocks, block_size, {num_kv_heads}, {head_dim}] and alike"
        )


def rotary_and_write_kv(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos in the first half, sin in the second
    head_dim: int,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip (padding)
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32; None = 1.0
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]: the rotated query
    """Rotate q and k (neox style) and store the rotated k and v in their cache slots, one launch;
    returns the rotated query as a new tensor."""
    num_tokens = query.shape[0]
    q, k, v = _rows(query, num_tokens), _rows(key, num_tokens), _rows(value, num_tokens)
    cs = cos_sin_cache if cos_sin_cache.stride()[-1] == 1 else cos_sin_cache.contiguous()
    if cs.shape[-1] != head_dim:
        raise ValueError(f"cos_sin_cache rows must be head_dim={head_dim} wide; got {cs.shape[-1]}")
    num_heads, num_kv_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    block_h = _BLOCK_H.get((head_dim, num_heads, num_kv_heads)) or _block_h(head_dim, num_heads, num_kv_heads)
    check_head_rows_cache("rotary_and_write_kv", k_cache, v_cache, num_kv_heads, head_dim)
    kcs, vcs = k_cache.stride(), v_cache.stride()
    mant, min_exp, fp8_max = _FP8_FORMATS.get(k_cache.dtype, _NOT_FP8)
    scaled = k_scale is not None
    if scaled and v_scale is None:
        raise ValueError("rotary_and_write_kv takes both k_scale and v_scale or neither")
    q_out = torch.empty(num_tokens, q.shape[1], dtype=q.dtype, device=q.device)
    if num_tokens > 0:
        pdl = pdl_enabled(q.device)
        # Constexprs passed positionally: keywords cost a dict build per launch (eager steps are host-bound).
        _rotary_write_kv_kernel[(num_tokens,)](
            q_out, q, k, v, positions, cs, k_cache, v_cache, slot_mapping,
            k_scale if scaled else slot_mapping, v_scale if scaled else slot_mapping,
            q.stride(0), q_out.stride(0), k.stride(0), v.stride(0), cs.stride(0),
            kcs[0], kcs[1], vcs[0], vcs[1],
            num_heads, num_kv_heads, k_cache.shape[1],
            head_dim // 2, block_h, mant, min_exp, fp8_max, scaled, pdl,
            num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
    return q_out if query.dim() == 2 else q_out.view(query.shape)


@triton.jit
def rotated_rows(x_rows, cs_rows, valid, HEAD_DIM: tl.constexpr):
    """[R, HEAD_DIM]: the heads at x_rows ([R, 1] pointers, `valid` [R]) rotated by the cos | sin rows
    at cs_rows ([R, 1]), in float32 and rounded to x's dtype. _rotated_halves' arithmetic with each
    element beside its partner in the other half, so a kernel that wants a whole head in one tile
    (paged attention's query, decode_attention's key) gets it bit for bit as the rotary ops give it."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, HEAD_DIM)
    in_half = offs_d % HALF
    mask = valid[:, None]
    x = tl.load(x_rows + offs_d[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    partner = tl.load(x_rows + (offs_d ^ HALF)[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cs_rows + in_half[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_rows + HALF + in_half[None, :], mask=mask, other=0.0).to(tl.float32)
    first = (offs_d < HALF)[None, :]
    # the same explicit fmas as _rotated_halves (a contraction the compiler chose would differ per kernel)
    return tl.where(first, tl.fma(xf, cos, -(partner * sin)), tl.fma(xf, cos, partner * sin)).to(x.dtype)
