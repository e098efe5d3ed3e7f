"""Seeded sampling noise for every seeded row of a step in one launch: the Triton form of
`ops.reference.seeded_exponential_` (the spec; same hashes bit for bit, noise within an ulp of log).

One program per (seeded row, column block). Each value is a pure function of (row key, column): the
row's two 32-bit round keys come from its 64-bit key, then h = mix(mix(c ^ k0) + k1), in uint32
arithmetic (wrapping multiplies and logical shifts, as the spec's masked int64). Replaces one
torch.Generator and one exponential_ launch per seeded row (256 rows: ~5 ms of host time a step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # columns per program: 32 programs a row for a 128k vocabulary


@triton.jit
def _mix32(x):
    # The spec's _mix32_: multiply-xorshift with the hash-prospector low-bias constants, on uint32.
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


@triton.jit
def _seeded_noise_kernel(
    out_ptr,  # [B, V] float32 noise, or [S, V] int64 hashes with HASH
    rows_ptr,  # [S] int64: the out row of each seeded row
    keys_ptr,  # [S] int64 in [0, 2**63)
    vocab_size,
    stride_out,
    BLOCK: tl.constexpr,
    HASH: tl.constexpr,  # write the uint32 hashes (as int64) instead of the noise: the tests' bit check
):
    s = tl.program_id(0)
    key = tl.load(keys_ptr + s)
    row = tl.load(rows_ptr + s)
    lo = key.to(tl.uint32)  # truncates: the low half
    hi = (key >> 32).to(tl.uint32)
    k0 = _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))
    k1 = _mix32(hi ^ _mix32(k0 + 0x7F4A7C15))
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab_size
    h = _mix32(_mix32(cols.to(tl.uint32) ^ k0) + k1)
    ptrs = out_ptr + row * stride_out + cols
    if HASH:
        tl.store(ptrs, h.to(tl.int64), mask=mask)
    else:
        # 23 bits: every midpoint ((h >> 9) + 0.5) * 2**-23 is exact in float32, none is 0 or 1.
        u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        tl.store(ptrs, -tl.log(u), mask=mask)


def seeded_exponential_(
    noise: torch.Tensor,  # [B, V] float32, updated in place
    rows: torch.Tensor,  # [S] int64: the seeded rows of the batch
    keys: torch.Tensor,  # [S] int64 in [0, 2**63)
) -> torch.Tensor:
    """noise[rows[s]] = the Exponential(1) noise of keys[s], in one launch; returns noise."""
    num_seeded, vocab_size = rows.numel(), noise.shape[1]
    if num_seeded > 0:
        assert noise.stride(1) == 1 and noise.dtype == torch.float32
        grid = (num_seeded, triton.cdiv(vocab_size, BLOCK))
        _seeded_noise_kernel[grid](noise, rows, keys, vocab_size, noise.stride(0), BLOCK, False, num_warps=4)
    return noise


def seeded_hash(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """keys [S] int64 -> [S, V] int64 uint32 hashes, as `ops.reference.seeded_hash`."""
    num_seeded = keys.numel()
    out = torch.empty(num_seeded, vocab_size, dtype=torch.int64, device=keys.device)  # [S, V]
    if num_seeded > 0:
        rows = torch.arange(num_seeded, dtype=torch.int64, device=keys.device)
        grid = (num_seeded, triton.cdiv(vocab_size, BLOCK))
        _seeded_noise_kernel[grid](out, rows, keys, vocab_size, out.stride(0), BLOCK, True, num_warps=4)
    return out
