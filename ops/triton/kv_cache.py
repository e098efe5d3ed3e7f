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


# BLOCK_H per (num_kv_heads, head_dim), stored once head_dim passed validation. Python ints only: valid for
# every batch size and across CUDA-graph capture and replay.
_BLOCK_H: dict[tuple[int, int], int] = {}


def _block_h(num_kv_heads: int, head_dim: int) -> int:
    if head_dim & (head_dim - 1):
        raise ValueError(f"write_kv_cache needs a power-of-two head_dim; got {head_dim}")
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // head_dim))
    _BLOCK_H[(num_kv_heads, head_dim)] = block_h
    return block_h


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip (padding)
) -> None:
    """Scatter this step's K/V into their cache slots, in place.

    Strides are read as one tuple per tensor (one call instead of one per dimension): eager forwards
    are host-bound.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    block_h = _BLOCK_H.get((num_kv_heads, head_dim)) or _block_h(num_kv_heads, head_dim)
    ks = key.stride()
    if ks[2] != 1:
        key = key.contiguous()
        ks = key.stride()
    vs = value.stride()
    if vs[2] != 1:
        value = value.contiguous()
        vs = value.stride()
    kcs, vcs = k_cache.stride(), v_cache.stride()
    if kcs[-1] != 1 or vcs[-1] != 1:
        raise ValueError("write_kv_cache needs caches contiguous in head_dim")
    if num_tokens > 0:
        # Constexprs passed positionally (HEAD_DIM, BLOCK_H): keywords cost a dict build per launch.
        _write_kv_cache_kernel[(num_tokens,)](
            key, value, k_cache, v_cache, slot_mapping,
            ks[0], ks[1], vs[0], vs[1],
            kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
            num_kv_heads, k_cache.shape[1],
            head_dim, block_h,
            num_warps=4,
        )  # fmt: skip
