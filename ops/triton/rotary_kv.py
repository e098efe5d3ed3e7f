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
Partial rotary (a cos/sin cache narrower than the head, ops.triton.rotary) rotates the first
rotary_dim dims of q and k and stores the rest of the key as it is.
The spec is ops.reference.rotary_and_write_kv (rotary_embedding, then write_kv_cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.head_dims import check_head_dim
from ops.triton.head_dim import head_rows_mask, pad
from ops.triton.kv_cache import _FP8_FORMATS, _NOT_FP8, _to_cache
from ops.triton.pdl import let_next_kernel_start, pdl_enabled, wait_for_previous_kernel
from ops.triton.rotary import (
    _cos_sin,
    _pass_dims,
    _rotate_heads,
    _rotated_halves,
    _rows,
    check_rotary_width,
    rotary_block_h,
)


@triton.jit
def _rotary_write_kv_kernel(
    q_out_ptr,  # [num_tokens, num_heads * head_dim]
    q_ptr,
    k_ptr,  # [num_tokens, num_kv_heads * head_dim]
    v_ptr,  # [num_tokens, num_kv_heads * head_dim]
    positions_ptr,  # [num_tokens]
    cos_sin_ptr,  # [max_position, rotary_dim]: cos | sin
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
    ROT_HALF: tl.constexpr = 0,  # rotary_dim / 2 where it is less than HALF; 0: the whole head rotates
):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + row).to(tl.int64)
    cos, sin = _cos_sin(cos_sin_ptr + pos * stride_cs, HALF, ROT_HALF)  # [1, HALF] each
    _rotate_heads(q_out_ptr, q_ptr, stride_q, stride_q_out, row, cos, sin, num_heads, HALF, BLOCK_H, ROT_HALF)
    slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
    if slot >= 0:
        # The cache rows of this slot: heads contiguous, each head_dim (= 2 * HALF) wide.
        kc = k_cache_ptr + slot // block_size * stride_kcb + slot % block_size * stride_kcs
        vc = v_cache_ptr + slot // block_size * stride_vcb + slot % block_size * stride_vcs
        if ROT_HALF != 0:
            _store_partial_rotary_kv(
                kc, vc, k_ptr + row * stride_k, v_ptr + row * stride_v, k_scale_ptr, v_scale_ptr, cos, sin,
                num_kv_heads, HALF, ROT_HALF, BLOCK_H, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED,
            )  # fmt: skip
        else:
            _store_rotary_kv(
                kc, vc, k_ptr + row * stride_k, v_ptr + row * stride_v, k_scale_ptr, v_scale_ptr, cos, sin,
                num_kv_heads, HALF, BLOCK_H, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED,
            )  # fmt: skip


@triton.jit
def _store_rotary_kv(
    kc, vc, k_row, v_row, k_scale_ptr, v_scale_ptr, cos, sin, num_kv_heads, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, FP8_MANT: tl.constexpr, FP8_MIN_EXP: tl.constexpr, FP8_MAX: tl.constexpr,
    SCALED: tl.constexpr,
):  # fmt: skip
    """One token's rotated keys and its values stored at the cache rows kc / vc (whole heads rotate)."""
    offs_d = tl.arange(0, pad(HALF))  # a padded head's lanes past HALF are masked off
    offs_h = tl.arange(0, BLOCK_H)
    for h0 in range(0, num_kv_heads, BLOCK_H):
        heads = h0 + offs_h
        mask_h = heads < num_kv_heads
        mask = head_rows_mask(mask_h, offs_d, HALF)
        idx = heads[:, None] * (2 * HALF) + offs_d[None, :]  # [BLOCK_H, pad(HALF)]
        # rounded to the model dtype, as the separate rotary op returns it
        r1, r2 = _rotated_halves(k_row, idx, mask, cos, sin, HALF)
        r1 = _to_cache(r1, k_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
        r2 = _to_cache(r2, k_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
        tl.store(kc + idx, r1.to(kc.dtype.element_ty), mask=mask)
        tl.store(kc + idx + HALF, r2.to(kc.dtype.element_ty), mask=mask)
        v1 = tl.load(v_row + idx, mask=mask, other=0.0)
        v2 = tl.load(v_row + idx + HALF, mask=mask, other=0.0)
        v1 = _to_cache(v1, v_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
        v2 = _to_cache(v2, v_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
        tl.store(vc + idx, v1.to(vc.dtype.element_ty), mask=mask)
        tl.store(vc + idx + HALF, v2.to(vc.dtype.element_ty), mask=mask)


@triton.jit
def _store_partial_rotary_kv(
    kc, vc, k_row, v_row, k_scale_ptr, v_scale_ptr, cos, sin, num_kv_heads, HALF: tl.constexpr,
    ROT_HALF: tl.constexpr, BLOCK_H: tl.constexpr, FP8_MANT: tl.constexpr, FP8_MIN_EXP: tl.constexpr,
    FP8_MAX: tl.constexpr, SCALED: tl.constexpr,
):  # fmt: skip
    """One token's keys (the first 2 * ROT_HALF dims of each head rotated, the rest as they are) and
    values stored at the cache rows kc / vc, rounded as the whole-head path rounds them."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, pad(HALF))  # ROT_HALF < HALF: the mask below leaves a padded head's extra lanes out
    for h0 in range(0, num_kv_heads, BLOCK_H):
        heads = h0 + offs_h
        mask_h = heads < num_kv_heads
        mask = mask_h[:, None] & (offs_d < ROT_HALF)[None, :]  # [BLOCK_H, HALF]
        idx = heads[:, None] * (2 * HALF) + offs_d[None, :]
        r1, r2 = _rotated_halves(k_row, idx, mask, cos, sin, ROT_HALF)
        r1 = _to_cache(r1, k_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
        r2 = _to_cache(r2, k_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
        tl.store(kc + idx, r1.to(kc.dtype.element_ty), mask=mask)
        tl.store(kc + idx + ROT_HALF, r2.to(kc.dtype.element_ty), mask=mask)
        pass_idx, pass_mask = _pass_dims(heads, mask_h[:, None], HALF, ROT_HALF)  # [BLOCK_H, 2 * HALF]
        k = tl.load(k_row + pass_idx, mask=pass_mask, other=0.0)
        k = _to_cache(k, k_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
        tl.store(kc + pass_idx, k.to(kc.dtype.element_ty), mask=pass_mask)
        whole = mask_h[:, None] & (tl.arange(0, pad(2 * HALF)) < 2 * HALF)[None, :]  # every dim of the value
        v = tl.load(v_row + pass_idx, mask=whole, other=0.0)
        v = _to_cache(v, v_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
        tl.store(vc + pass_idx, v.to(vc.dtype.element_ty), mask=whole)


# BLOCK_H per (head_dim, num_heads, num_kv_heads), stored once validated. Python ints only: valid for
# every batch size and across CUDA-graph capture and replay.
_BLOCK_H: dict[tuple[int, int, int], int] = {}


def _block_h(head_dim: int, num_heads: int, num_kv_heads: int) -> int:
    check_head_dim("rotary_and_write_kv", head_dim)
    block_h = rotary_block_h(head_dim, num_heads, num_kv_heads)
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
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos in the first half, sin in the second
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
    rot_half = check_rotary_width("rotary_and_write_kv", cs.shape[-1], head_dim)
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
            head_dim // 2, block_h, mant, min_exp, fp8_max, scaled, pdl, rot_half,
            num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
    return q_out if query.dim() == 2 else q_out.view(query.shape)


@triton.jit
def rotated_rows(x_rows, cs_rows, valid, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr = 0):
    """[R, pad(HEAD_DIM)]: the heads at x_rows ([R, 1] pointers, `valid` [R]) rotated by the cos | sin
    rows at cs_rows ([R, 1]), in float32 and rounded to x's dtype; zero past HEAD_DIM (a padded head).
    _rotated_halves' arithmetic with each element beside its partner in the other half, so a kernel
    that wants a whole head in one tile (paged attention's query, decode_attention's key) gets it bit
    for bit as the rotary ops give it. ROT_HALF > 0 (partial rotary): only the first 2 * ROT_HALF dims
    rotate, the rest come back as they are."""
    if ROT_HALF == 0:
        if pad(HEAD_DIM) == HEAD_DIM:
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
            rotated = tl.where(first, tl.fma(xf, cos, -(partner * sin)), tl.fma(xf, cos, partner * sin))
            out = rotated.to(x.dtype)
        else:  # a padded head (its halves' partners are not an XOR away): every dim rotating
            out = _rotated_part(x_rows, cs_rows, valid, HEAD_DIM, HEAD_DIM // 2)
    else:
        out = _rotated_part(x_rows, cs_rows, valid, HEAD_DIM, ROT_HALF)
    return out


@triton.jit
def _rotated_part(x_rows, cs_rows, valid, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr):
    """rotated_rows with the first 2 * ROT_HALF dims rotating (all of them when 2 * ROT_HALF is
    HEAD_DIM), the rest as they are; [R, pad(HEAD_DIM)], zero past HEAD_DIM."""
    offs_d = tl.arange(0, pad(HEAD_DIM))
    is_first = offs_d < ROT_HALF
    is_rot = offs_d < 2 * ROT_HALF
    in_half = tl.where(is_first, offs_d, offs_d - ROT_HALF)  # cos/sin column (rotated dims only)
    partner_d = tl.where(is_first, offs_d + ROT_HALF, tl.where(is_rot, offs_d - ROT_HALF, offs_d))
    mask = head_rows_mask(valid, offs_d, HEAD_DIM)
    rot_mask = mask & is_rot[None, :]
    x = tl.load(x_rows + offs_d[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    partner = tl.load(x_rows + partner_d[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cs_rows + in_half[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_rows + ROT_HALF + in_half[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    rotated = tl.where(
        is_first[None, :], tl.fma(xf, cos, -(partner * sin)), tl.fma(xf, cos, partner * sin)
    ).to(x.dtype)
    return tl.where(is_rot[None, :], rotated, x)
