"""Neox-style rotary embedding Triton kernel (rotate the two halves of each head).

The cos/sin cache is precomputed by the model (llama3 / rope scaling already baked in), so the kernel is
a gather of one cache row per token plus an elementwise rotation of every q and k head of that token.

Partial rotary (Phi-3's partial_rotary_factor): the cache's rows are rotary_dim < head_dim wide; only
the first rotary_dim dims of each head rotate (halves of ROT_HALF = rotary_dim / 2, which need not be
a power of two: Phi-4-mini's is 48) and the rest are copied. ROT_HALF = 0 (the default) is the whole
head, compiled exactly as before the option existed.
Heads that are not a power of two (Phi-3's 96: halves of 48) span pad(HALF) lanes, those past HALF
masked off (ops/triton/head_dim.py); a power-of-two head compiles as before.
Returns new tensors, like `ops.reference.rotary_embedding`: q and k are usually views into the fused
QKV projection, and writing them in place would surprise a caller that still reads that buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.head_dims import check_head_dim
from ops.triton.head_dim import head_rows_mask, pad


@triton.jit
def _rotated_halves(x_row, idx, mask, cos, sin, HALF: tl.constexpr):
    """The two rotated halves of the heads at x_row + idx ([BLOCK_H, HALF] each), computed in float32
    and rounded to x's dtype, as the rotary op returns them."""
    x1 = tl.load(x_row + idx, mask=mask, other=0.0)
    x2 = tl.load(x_row + idx + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    # Explicit fmas: left as a * b - c * d, the compiler picks which product it fuses per kernel, and the
    # fused decode attention (rotated_rows) then stored keys one float32 ulp apart from this op's (H200).
    return tl.fma(x1f, cos, -(x2f * sin)).to(x1.dtype), tl.fma(x2f, cos, x1f * sin).to(x1.dtype)


@triton.jit
def _rotate_heads(
    out_ptr, x_ptr, stride_x, stride_out, row, cos, sin, num_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    ROT_HALF: tl.constexpr = 0,
):  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, pad(HALF))  # a padded head's lanes past HALF are masked off
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + offs_h
        o_row = out_ptr + row * stride_out
        if ROT_HALF == 0:  # the whole head rotates
            mask = head_rows_mask(heads < num_heads, offs_d, HALF)
            idx = heads[:, None] * (2 * HALF) + offs_d[None, :]  # [BLOCK_H, pad(HALF)]
            r1, r2 = _rotated_halves(x_ptr + row * stride_x, idx, mask, cos, sin, HALF)
            tl.store(o_row + idx, r1, mask=mask)
            tl.store(o_row + idx + HALF, r2, mask=mask)
        else:
            mask_h = (heads < num_heads)[:, None]
            mask = mask_h & (offs_d < ROT_HALF)[None, :]  # [BLOCK_H, HALF]: the first ROT_HALF columns
            idx = heads[:, None] * (2 * HALF) + offs_d[None, :]
            r1, r2 = _rotated_halves(x_ptr + row * stride_x, idx, mask, cos, sin, ROT_HALF)
            tl.store(o_row + idx, r1, mask=mask)
            tl.store(o_row + idx + ROT_HALF, r2, mask=mask)
            # the dims past rotary_dim, copied as they are
            pass_idx, pass_mask = _pass_dims(heads, mask_h, HALF, ROT_HALF)
            x = tl.load(x_ptr + row * stride_x + pass_idx, mask=pass_mask, other=0.0)
            tl.store(o_row + pass_idx, x, mask=pass_mask)


@triton.jit
def _pass_dims(heads, mask_h, HALF: tl.constexpr, ROT_HALF: tl.constexpr):
    """Offsets [BLOCK_H, pad(2 * HALF)] over whole heads and the mask of the dims that do not rotate."""
    offs = tl.arange(0, pad(2 * HALF))
    passed = offs >= 2 * ROT_HALF
    if pad(2 * HALF) != 2 * HALF:  # a padded head: not the lanes past it
        passed = passed & (offs < 2 * HALF)
    return heads[:, None] * (2 * HALF) + offs[None, :], mask_h & passed[None, :]


@triton.jit
def _cos_sin(cs_row, HALF: tl.constexpr, ROT_HALF: tl.constexpr):
    """The [1, pad(HALF)] float32 cos and sin of one cache row (ROT_HALF = 0: HALF wide; else its first
    ROT_HALF columns; zero past them: those lanes are masked off where they are used)."""
    offs_d = tl.arange(0, pad(HALF))
    if ROT_HALF == 0:
        if pad(HALF) == HALF:
            cos = tl.load(cs_row + offs_d).to(tl.float32)[None, :]
            sin = tl.load(cs_row + HALF + offs_d).to(tl.float32)[None, :]
        else:  # a padded head
            cos, sin = _cos_sin_columns(cs_row, offs_d, HALF)
    else:
        cos, sin = _cos_sin_columns(cs_row, offs_d, ROT_HALF)
    return cos, sin


@triton.jit
def _cos_sin_columns(cs_row, offs_d, WIDTH: tl.constexpr):
    """[1, len(offs_d)] float32 cos and sin of a cache row's first WIDTH columns (cos | sin, each WIDTH
    wide), zero past them."""
    rot = offs_d < WIDTH
    cos = tl.load(cs_row + offs_d, mask=rot, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_row + WIDTH + offs_d, mask=rot, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_out_ptr,  # [num_tokens, num_heads * head_dim]
    k_out_ptr,  # [num_tokens, num_kv_heads * head_dim]
    q_ptr,
    k_ptr,
    positions_ptr,  # [num_tokens]
    cos_sin_ptr,  # [max_position, rotary_dim]: cos | sin
    stride_q,
    stride_k,
    stride_q_out,
    stride_k_out,
    stride_cs,
    num_heads,
    num_kv_heads,
    HALF: tl.constexpr,  # head_dim / 2
    BLOCK_H: tl.constexpr,
    ROT_HALF: tl.constexpr = 0,  # rotary_dim / 2 where it is less than HALF; 0: the whole head rotates
):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + row).to(tl.int64)
    cos, sin = _cos_sin(cos_sin_ptr + pos * stride_cs, HALF, ROT_HALF)
    _rotate_heads(q_out_ptr, q_ptr, stride_q, stride_q_out, row, cos, sin, num_heads, HALF, BLOCK_H, ROT_HALF)
    _rotate_heads(
        k_out_ptr, k_ptr, stride_k, stride_k_out, row, cos, sin, num_kv_heads, HALF, BLOCK_H, ROT_HALF
    )


# BLOCK_H per (head_dim, cos_sin width, q width, k width), stored once those passed validation. Python
# ints only: valid for every batch size and across CUDA-graph capture and replay.
_BLOCK_H: dict[tuple[int, int, int, int], int] = {}


def check_rotary_width(op: str, cs_width: int, head_dim: int) -> int:
    """ROT_HALF for a cos/sin cache `cs_width` wide: 0 when it covers the head, else cs_width / 2."""
    if cs_width % 2 or not 0 < cs_width <= head_dim:
        raise ValueError(
            f"{op}: cos_sin_cache rows must be an even width <= head_dim={head_dim}; got {cs_width}"
        )
    return 0 if cs_width == head_dim else cs_width // 2


def rotary_block_h(head_dim: int, num_heads: int, num_kv_heads: int) -> int:
    """Heads a step: about 4,096 lanes (a padded head's count, so BLOCK_H stays a power of two)."""
    return min(
        triton.next_power_of_2(max(num_heads, num_kv_heads)), max(1, 4096 // triton.next_power_of_2(head_dim))
    )


def _block_h(head_dim: int, cs_width: int, q_width: int, k_width: int) -> int:
    check_head_dim("rotary_embedding", head_dim)
    check_rotary_width("rotary_embedding", cs_width, head_dim)
    num_heads, num_kv_heads = q_width // head_dim, k_width // head_dim
    block_h = rotary_block_h(head_dim, num_heads, num_kv_heads)
    _BLOCK_H[(head_dim, cs_width, q_width, k_width)] = block_h
    return block_h


def _rows(t: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens, width] with unit stride along width; a view when the layout allows."""
    if t.dim() != 2:
        t = t.reshape(num_tokens, -1)
    return t if t.stride()[1] == 1 else t.contiguous()


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos in the first half, sin in the second
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding; returns new tensors of the input shapes and dtypes.

    The model passes 2-D q/k (views into the fused qkv buffer): then there is no reshape, and the outputs
    are allocated at the input shapes directly, so nothing is viewed on the way out (host-bound eager path).
    """
    num_tokens = query.shape[0]
    q = _rows(query, num_tokens)  # [num_tokens, num_heads * head_dim]
    k = _rows(key, num_tokens)  # [num_tokens, num_kv_heads * head_dim]
    cs = cos_sin_cache if cos_sin_cache.stride()[-1] == 1 else cos_sin_cache.contiguous()
    q_width, k_width, cs_width = q.shape[1], k.shape[1], cs.shape[-1]
    block_h = _BLOCK_H.get((head_dim, cs_width, q_width, k_width)) or _block_h(
        head_dim, cs_width, q_width, k_width
    )
    q_out = torch.empty(num_tokens, q_width, dtype=q.dtype, device=q.device)  # [num_tokens, q_width]
    k_out = torch.empty(num_tokens, k_width, dtype=k.dtype, device=k.device)  # [num_tokens, k_width]
    if num_tokens > 0:
        # Constexprs passed positionally (HALF, BLOCK_H): keywords cost a dict build per launch.
        _rotary_kernel[(num_tokens,)](
            q_out, k_out, q, k, positions, cs,
            q.stride(0), k.stride(0), q_width, k_width, cs.stride(0),  # the outputs are contiguous
            q_width // head_dim, k_width // head_dim,
            head_dim // 2, block_h, 0 if cs_width == head_dim else cs_width // 2,
            num_warps=4,
        )  # fmt: skip
    if query.dim() != 2:
        q_out = q_out.view(query.shape)
    if key.dim() != 2:
        k_out = k_out.view(key.shape)
    return q_out, k_out
