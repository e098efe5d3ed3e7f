"""Head sizes that are not powers of two (Phi-3's 96; 80, 112, 160, 192 elsewhere) in the kernels that
hold a whole head in one tile: paged attention, the KV write, rotary and rotary + KV write.

tl.arange needs a power-of-two length, so such a kernel spans a head with pad(HEAD_DIM) lanes (the next
power of two), masks the lanes past HEAD_DIM (loads read 0 there, so dot products, rotations and sums
are unchanged; stores skip them) and keeps the real HEAD_DIM for strides and offsets. Every mask of that
kind sits behind a constexpr test of pad(HEAD_DIM) != HEAD_DIM: for a power-of-two head the kernels
compile to the code they compiled to before (SASS compared on sm_90 without a GPU: tools/kernel_asm.py).

A padded head costs the lanes of its power of two (96 computes as 128): the price of one kernel for
every size. Which sizes are taken: ops/head_dims.py.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.constexpr_function
def pad(n: int) -> int:
    """The power-of-two lane count that spans n (n itself when it is one); usable on constexprs in a kernel."""
    return triton.next_power_of_2(n)


@triton.jit
def head_lanes(offs_d, HEAD_DIM: tl.constexpr):
    """[1, pad(HEAD_DIM)] mask of a head's real lanes (offs_d: tl.arange(0, pad(HEAD_DIM)))."""
    return (offs_d < HEAD_DIM)[None, :]


@triton.jit
def head_rows_mask(rows_valid, offs_d, HEAD_DIM: tl.constexpr):
    """[R, pad(HEAD_DIM)] (or [R, 1] for a power-of-two head) mask of rows `rows_valid` ([R]) and of the
    head's real lanes; for a power-of-two head exactly rows_valid[:, None], as the kernels had it."""
    if pad(HEAD_DIM) != HEAD_DIM:
        return rows_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    else:
        return rows_valid[:, None]
