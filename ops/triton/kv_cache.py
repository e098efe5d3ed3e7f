"""write_kv_cache Triton kernel: scatter each token's K and V rows into their paged cache slots.

One program per token; slot -1 (padding) writes nothing, so CUDA-graph padding never touches the cache.

FP8 caches (float8_e4m3fn, float8_e5m2): each head's K and V are multiplied by the reciprocal of that
head's scale (k_scale / v_scale: [num_kv_heads] float32 device tensors, read in the kernel, so a CUDA
graph replays whatever they hold; the reciprocal is IEEE-rounded, div_rn, as torch's 1 / scale),
clamped to the format's range and rounded to nearest even in float32 arithmetic
(`_round_to_fp8`) before the cast, so the cast itself is exact: the result is the reference's
(torch's rounding) bit for bit on any GPU, on one whose converter rounds through float16 (e5m2 on
pre-Hopper cards), and under the Triton interpreter, whose fp8 downcast drops carries (30.6 -> 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.head_dims import check_head_dim
from ops.triton.head_dim import head_rows_mask, pad


@triton.jit
def _round_to_fp8(x, MANT: tl.constexpr, MIN_EXP: tl.constexpr, MAX: tl.constexpr):
    """float32 x -> the nearest value (ties to even) of an fp8 format with MANT mantissa bits, smallest
    normal exponent MIN_EXP and largest finite MAX, saturating; still float32."""
    x = tl.minimum(tl.maximum(x, -MAX), MAX)
    bits = x.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    # float32 mantissa bits to drop: 23 - MANT for fp8 normals, more below (fp8 subnormals share the
    # fixed step 2**(MIN_EXP - MANT)); above 23 the value is under that step: 0 or the step itself.
    drop = tl.maximum(23 - MANT, 23 - MANT + (127 + MIN_EXP) - exp)
    s = tl.minimum(drop, 23)
    lsb = (((bits & 0x7FFFFF) | 0x800000) >> s) & 1  # the kept significand's last bit (implicit 1 too)
    rounded = ((bits + ((1 << (s - 1)) - 1) + lsb) & ~((1 << s) - 1)).to(tl.float32, bitcast=True)
    step = 2.0 ** (MIN_EXP - MANT)
    tiny = tl.where(tl.abs(x) > step * 0.5, step, 0.0)  # a tie (exactly half) goes to even: 0
    tiny = tl.where(bits < 0, -tiny, tiny)  # keeps -0.0
    return tl.where(drop > 23, tiny, rounded)


@triton.jit
def _to_cache(x, scale_ptr, heads, mask_h, FP8_MANT: tl.constexpr, FP8_MIN_EXP: tl.constexpr,
              FP8_MAX: tl.constexpr, SCALED: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """[BLOCK_H, D] rows of heads `heads` -> what the cache stores of them: for an fp8 cache, float32
    values scaled by each head's reciprocal scale (SCALED) and rounded to the format, so the cast to it
    is exact; for a cache in the model's dtype, x as it is."""
    if FP8_MANT > 0:
        x = x.to(tl.float32)
        if SCALED:
            one = tl.full([BLOCK_H], 1.0, tl.float32)
            scale = tl.load(scale_ptr + heads, mask=mask_h, other=1.0)  # [BLOCK_H]
            x = x * tl.math.div_rn(one, scale)[:, None]
        x = _round_to_fp8(x, FP8_MANT, FP8_MIN_EXP, FP8_MAX)
    return x


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    k_scale_ptr,  # [num_kv_heads] float32 (SCALED fp8 caches)
    v_scale_ptr,
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
    FP8_MANT: tl.constexpr,  # 0: the cache is in the model's dtype; else its fp8 format's
    FP8_MIN_EXP: tl.constexpr,
    FP8_MAX: tl.constexpr,
    SCALED: tl.constexpr,  # scales given (else 1.0: nothing is multiplied)
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, pad(HEAD_DIM))  # a padded head's extra lanes are masked off
        for h0 in range(0, num_kv_heads, BLOCK_H):
            heads = h0 + offs_h
            mask_h = heads < num_kv_heads
            mask = head_rows_mask(mask_h, offs_d, HEAD_DIM)  # [BLOCK_H, pad(HEAD_DIM)] or [BLOCK_H, 1]
            k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
            v = tl.load(
                value_ptr + token * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask
            )
            kc = k_cache_ptr + block * stride_kcb + offset * stride_kcs
            vc = v_cache_ptr + block * stride_vcb + offset * stride_vcs
            k = _to_cache(k, k_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
            v = _to_cache(v, v_scale_ptr, heads, mask_h, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, BLOCK_H)
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


# (mantissa bits, smallest normal exponent, largest finite) of the fp8 cache formats
_FP8_FORMATS: dict[torch.dtype, tuple[int, int, float]] = {
    torch.float8_e4m3fn: (3, -6, 448.0),
    torch.float8_e5m2: (2, -14, 57344.0),
}
_NOT_FP8 = (0, 0, 0.0)

# BLOCK_H per (num_kv_heads, head_dim), stored once head_dim passed validation. Python ints only: valid for
# every batch size and across CUDA-graph capture and replay.
_BLOCK_H: dict[tuple[int, int], int] = {}


def _block_h(num_kv_heads: int, head_dim: int) -> int:
    check_head_dim("write_kv_cache", head_dim)
    # about 4,096 lanes a step (a padded head's count: BLOCK_H stays a power of two)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // triton.next_power_of_2(head_dim)))
    _BLOCK_H[(num_kv_heads, head_dim)] = block_h
    return block_h


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip (padding)
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32; None = 1.0
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] float32; None = 1.0
) -> None:
    """Scatter this step's K/V into their cache slots, in place (fp8 caches: quantized, see the top).

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
    mant, min_exp, fp8_max = _FP8_FORMATS.get(k_cache.dtype, _NOT_FP8)
    scaled = k_scale is not None
    if scaled and v_scale is None:
        raise ValueError("write_kv_cache takes both k_scale and v_scale or neither")
    if num_tokens > 0:
        # Constexprs passed positionally (HEAD_DIM, BLOCK_H, ...): keywords cost a dict build per launch.
        # Without scales the kernel reads none; slot_mapping stands in for their pointers.
        _write_kv_cache_kernel[(num_tokens,)](
            key, value, k_cache, v_cache, slot_mapping,
            k_scale if scaled else slot_mapping, v_scale if scaled else slot_mapping,
            ks[0], ks[1], vs[0], vs[1],
            kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
            num_kv_heads, k_cache.shape[1],
            head_dim, block_h, mant, min_exp, fp8_max, scaled,
            num_warps=4,
        )  # fmt: skip
