"""Asking L2 for the next kernel's weights while this one finishes (WEIR_L2_PREFETCH=1, sm_90).

Used by the decode GEMVs (ops/triton/w4_half2_gemv.py, ops/triton/fp8_gemv.py for bf16 and FP8
weights). Why: every decode GEMV of a batch-1 step spends ~2.4 us more than its bytes take even when it
only reads (loadtest/probe_w4_layout.py at ea9949b: the W4A16 words alone in the GEMV's tiles, 0.43-0.84 of
the copy bandwidth), the memory pipeline filling at its start and draining at its end, 128 times a
step; the small kernels between the GEMVs (norms, attention) leave the memory idle meanwhile. Here each
program of a GEMV, once its own tiles are read, hands the GPU one bulk L2 prefetch
(`cp.async.bulk.prefetch.L2.global`, a fire-and-forget request the SM's TMA unit serves) of its slice
of the next projection's weights, so that GEMV's first loads find L2 warm. The slices follow the
programs' launch order (program 0 the first bytes): the next GEMV's first wave reads the first rows.

A prefetch changes no value, only where the bytes come from: the outputs are the same with and without
it. Off (WEIR_L2_PREFETCH; engine/model/quantization/l2_prefetch_chain.py decides who asks for what): on an
H200 it made L1's bf16 batch-1 step 4.8% slower (4.462 against 4.257 ms, 6e851bf).

A second experiment, each one-token W4A16 / FP8 GEMV of up to 32 MiB of weights asking L2 for its own weights
(bulk prefetches, a run a thread) before PDL's wait, while the kernel before it leaves the memory idle
(WEIR_GEMV_L2_OWN, 35b0dbd), was slower too: on an H100, alternating runs in one call at 893db28, the GPTQ
batch-1 step 2.497 / 2.501 -> 2.618 / 2.621 ms (Q1 0.4615x -> 0.4835x bf16) and the FP8 one 3.310 / 3.309 ->
3.469 / 3.473 ms (Q2 0.611x -> 0.6405x), loadtest/results/t1-l2own-h100-2026-12-07-9edeecd/: removed.

`prefetch_runs` serves the other experiment, WEIR_GEMV_L2_OWN (off, not timed yet): each one-token GEMV
program asks L2 for its own weights before PDL's wait, while the kernel before it (a norm, the attention)
leaves the memory idle, rather than the next GEMV's weights at its own tail. Only PTX of sm_90 (Hopper) has
the bulk prefetch; elsewhere, and in the Triton interpreter (no PTX), nothing is prefetched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# one thread of the program issues it (every thread runs the asm; the predicate keeps one)
_PREFETCH_PTX: tl.constexpr = tl.constexpr(
    "{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
    "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }"
)


@triton.jit
def prefetch_slice(base_ptr, nbytes, part, parts):
    """Program `part` of `parts` asks L2 for its share of the `nbytes` at `base_ptr` (a byte pointer,
    16-byte aligned): whole 16-byte chunks (the bulk prefetch's unit; a tail under 16 bytes is left),
    the last share what is left."""
    whole = nbytes // 16 * 16
    share = (whole // parts + 15) // 16 * 16
    start = part * share
    size = tl.minimum(share, whole - start)
    if size > 0:
        tl.inline_asm_elementwise(
            _PREFETCH_PTX,
            "=r,l,r",
            [base_ptr + start, size.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def prefetch_next_weights(base_ptr, nbytes, second):
    """A GEMV program's share of the next weights (its place in launch order over the whole 3-D grid):
    the `nbytes` at `base_ptr` and, when `second` > 0, the `nbytes` at `base_ptr + second` (l2_next_args)."""
    part = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    parts = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    prefetch_slice(base_ptr, nbytes, part, parts)
    if second > 0:
        prefetch_slice(base_ptr + second, nbytes, part, parts)


def l2_next_args(op: str, l2_next: torch.Tensor | None) -> tuple[int, int]:
    """A GEMV's `l2_next` checked -> (bytes of a range, offset of the second range or 0).

    None, a flat uint8 view of 16-byte aligned weights (one range), or a [2, n] uint8 view whose rows are
    16-byte aligned (two ranges: the starts of a [gate; up] weight's halves, which a gated GEMV reads
    side by side)."""
    if l2_next is None:
        return 0, 0
    two = (
        l2_next.dim() == 2
        and l2_next.shape[0] == 2
        and l2_next.stride(1) == 1
        and l2_next.stride(0) % 16 == 0
    )
    if l2_next.dtype != torch.uint8 or not (l2_next.dim() == 1 or two) or l2_next.data_ptr() % 16:
        raise ValueError(
            f"{op}: l2_next must be a flat uint8 view of 16-byte aligned weights, or [2, n] of two"
        )
    return l2_next.shape[-1], l2_next.stride(0) if two else 0
