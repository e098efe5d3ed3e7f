"""The sampler's last step in one pass: out[b] = argmax_v(logits[b, v] - log(noise[b, v])).

With Exponential(1) noise this draws from softmax(logits) (the exponential race: argmax p / E), without
computing the softmax; with no noise it is the greedy argmax. In torch the random path was five
launches over [B, V] float32 (softmax, clamp, divide, argmax, plus the noise): each a full pass over
the logits, and at batch 1 single-row kernels that leave most SMs idle. Here every row is cut into
`parts` slices so that a batch of any size has a few programs per SM (a runtime argument: every batch
size runs one compiled kernel, since the sampler runs outside the CUDA graphs and a new constexpr would
compile mid-serving). Each program keeps, per lane, the best value and its first index over its slice,
reduces them, and stores its (value, index); with more than one slice the last program of a row (a
ticket from ops/triton/split_k.py's counters) merges the row's partials and puts the counter back to
zero.

Ties go to the smallest index, as torch.argmax; a row whose values are all -inf gives its first index
(0), as torch does. NaN logits are not picked (torch would pick one): the engine never produces them.
The spec is ops.reference.sample_argmax (tests/ops/test_sample_argmax.py, under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ops.triton.split_k import MAX_TILES, split_counters

BLOCK = 1024  # vocabulary entries per loop step of a program
MAX_PARTS = 64  # most slices per row (a power of two: the merge loads up to that many as one vector)
_TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: a 0 draw keeps log finite
_NO_INDEX = tl.constexpr(2**31 - 1)  # a lane (or slice) that has seen no entry yet


@triton.jit
def _best(values, indices):
    """(max, its smallest index) of a vector; indices of lanes that never held a value are _NO_INDEX."""
    top = tl.max(values, axis=0)
    first = tl.min(tl.where(values == top, indices, _NO_INDEX), axis=0)
    return top, first


@triton.jit(do_not_specialize=["parts", "slice_size"])
def _sample_argmax_kernel(
    logits_ptr,  # [B, V] (read as float32)
    noise_ptr,  # [B, V] float32 (HAS_NOISE)
    part_value_ptr,  # [B, parts] float32
    part_index_ptr,  # [B, parts] int32
    counters_ptr,  # [B] int32 zeros (parts > 1), left zero
    out_ptr,  # [B] int64
    vocab_size,
    parts,  # slices per row (grid axis 1), <= MAX_PARTS: a runtime value, so batch sizes share one compile
    slice_size,  # vocabulary entries per program, a multiple of BLOCK
    stride_l,
    stride_n,
    HAS_NOISE: tl.constexpr,
    MAX_PARTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    start = part * slice_size
    end = tl.minimum(start + slice_size, vocab_size)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_index = tl.full([BLOCK], _NO_INDEX, dtype=tl.int32)
    logits_row = logits_ptr + row.to(tl.int64) * stride_l
    noise_row = noise_ptr + row.to(tl.int64) * stride_n
    for offset in range(start, end, BLOCK):
        index = offset + lanes
        mask = index < end
        value = tl.load(logits_row + index, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_NOISE:
            draw = tl.load(noise_row + index, mask=mask, other=1.0)
            value = value - tl.log(tl.maximum(draw, _TINY))
        # Strictly greater: each lane keeps its first index among equal values (indices only grow).
        # A lane still at _NO_INDEX takes any value but NaN, so a row of -inf has an index.
        better = (value > best) | ((best_index == _NO_INDEX) & mask & (value == value))
        best = tl.where(better, value, best)
        best_index = tl.where(better, index, best_index)
    top, first = _best(best, best_index)
    if parts == 1:
        tl.store(out_ptr + row, first.to(tl.int64))
    else:
        tl.store(part_value_ptr + row * parts + part, top)
        tl.store(part_index_ptr + row * parts + part, first)
        tl.debug_barrier()
        if tl.atomic_add(counters_ptr + row, 1, sem="acq_rel", scope="gpu") == parts - 1:
            slices = tl.arange(0, MAX_PARTS)
            valid = slices < parts
            values = tl.load(
                part_value_ptr + row * parts + slices, mask=valid, other=float("-inf"), cache_modifier=".cg"
            )
            indices = tl.load(
                part_index_ptr + row * parts + slices, mask=valid, other=_NO_INDEX, cache_modifier=".cg"
            )
            top, first = _best(values, indices)
            tl.store(out_ptr + row, first.to(tl.int64))
            tl.atomic_xchg(counters_ptr + row, 0, sem="relaxed", scope="gpu")


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _parts(rows: int, vocab_size: int, device: torch.device) -> int:
    """Slices per row: about four programs per SM over the batch, each at least one BLOCK, a power of
    two up to MAX_PARTS (132 SMs assumed off CUDA)."""
    sms = _sm_count(device)
    parts = min(MAX_PARTS, max(1, (4 * sms) // rows), triton.cdiv(vocab_size, BLOCK))
    return 1 << (parts.bit_length() - 1)


def sample_argmax(
    logits: torch.Tensor,  # [B, V] float32
    noise: torch.Tensor | None,  # [B, V] float32 Exponential(1) draws, or None (greedy)
) -> torch.Tensor:  # [B] int64
    """Per row, the index of the largest logits - log(max(noise, tiny)) (of logits without noise)."""
    rows, vocab_size = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    if noise is not None and noise.stride(1) != 1:
        noise = noise.contiguous()
    parts = _parts(rows, vocab_size, logits.device) if rows <= MAX_TILES else 1
    # Whole BLOCKs per slice; the last slice may hold none (it then reports no index, and loses).
    slice_size = triton.cdiv(triton.cdiv(vocab_size, parts), BLOCK) * BLOCK
    # Allocated even for one slice (then untouched): `parts` is a runtime value, so the merge branch is
    # compiled for every launch, and placeholders of other types would not type-check there.
    part_value = torch.empty(rows, parts, dtype=torch.float32, device=logits.device)
    part_index = torch.empty(rows, parts, dtype=torch.int32, device=logits.device)
    counters = split_counters(logits.device)
    has_noise = noise is not None
    _sample_argmax_kernel[(rows, parts)](
        logits, noise if has_noise else logits, part_value, part_index, counters, out,
        vocab_size, parts, slice_size, logits.stride(0), noise.stride(0) if has_noise else 0,
        HAS_NOISE=has_noise, MAX_PARTS=MAX_PARTS, BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    return out
