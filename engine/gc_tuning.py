"""The cyclic garbage collector while the engine steps: fewer young-generation collections.

A step allocates thousands of short-lived containers (candidate tuples, per-request lists, outputs),
almost all freed at once by reference counting; CPython still counts them and runs a young collection
every 700 net allocations. Beam search, whose beams keep small structures alive for many steps, paid
~10% of its host time in those collections (tiny model on CPU, GC callbacks timed: 0.16 s of 1.6 s
over 256 beams x 128 steps; 0.005 s with a threshold of 10,000). `young_collections_every(n)` raises
the first threshold while the engine runs and puts back what it found; cycles are still collected,
just in larger batches.

`WEIR_GC_GEN0` sets n (default 50,000; 700, CPython's own default, turns the tuning off).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_GEN0 = 50_000


def gen0_threshold() -> int:
    """The young-generation threshold the engine runs with (WEIR_GC_GEN0, else DEFAULT_GEN0)."""
    raw = os.environ.get("WEIR_GC_GEN0", "")
    try:
        value = int(raw) if raw else DEFAULT_GEN0
    except ValueError:
        raise ValueError(f"WEIR_GC_GEN0 must be a positive integer; got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"WEIR_GC_GEN0 must be a positive integer; got {raw!r}")
    return value


@contextmanager
def young_collections_every(allocations: int | None = None) -> Iterator[None]:
    """Inside: gen0's threshold is `allocations` (default gen0_threshold()); after: what it was
    (unless someone else changed it meanwhile, which then stands)."""
    before = gc.get_threshold()
    wanted = (allocations or gen0_threshold(), *before[1:])
    gc.set_threshold(*wanted)
    try:
        yield
    finally:
        if gc.get_threshold() == wanted:
            gc.set_threshold(*before)
