"""write_kv_cache Triton kernel: scatter each token's K and V rows into their paged cache slots.

One program per token; slot -1 (padding) writes nothing, so CUDA-graph padding never touches the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    num_kv_heads,
    block_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, HEAD_DIM)
        for h0 in range(0, num_kv_heads, BLOCK_H):
            heads = h0 + offs_h
            mask = (heads < num_kv_heads)[:, None]
            k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
            v = tl.load(
                value_ptr + token * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask
            )
            kc = k_cache_ptr + block * stride_kcb + offset * stride_kcs
            vc = v_cache_ptr + block * stride_vcb + offset * stride_vcs
            tl.store(
                kc + heads[:, None] * stride_kch + offs_d[None, :],
                k.to(k_cache_ptr.dtype.element_ty),
                mask=mask,
            )
            tl.store(
                vc + heads[:, None] * stride_vch + offs_d[None, :],
                v.to(v_cache_ptr.dtype.element_ty),
                mask=mask,
            )


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip (padding)
) -> None:
    """Scatter this step's K/V into their cache slots, in place."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"write_kv_cache needs a power-of-two head_dim; got {head_dim}")
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("write_kv_cache needs caches contiguous in head_dim")
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // head_dim))
    if num_tokens > 0:
        _write_kv_cache_kernel[(num_tokens,)](
            key,
            value,
            k_cache,
            v_cache,
            slot_mapping,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            num_kv_heads,
            k_cache.shape[1],
            HEAD_DIM=head_dim,
            BLOCK_H=block_h,
            num_warps=4,
        )
