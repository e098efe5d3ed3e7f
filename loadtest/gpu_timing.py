"""Kernel timing that means what a decode step sees: CUDA-graph replays (no host launch overhead, as
the engine runs its decode steps) over enough copies of the operands that they cannot stay in L2
between calls (as 32 layers' weights cannot).

triton.testing.do_bench launches eagerly: a ~10 us kernel then measures the Python launcher, and a
graph of one weight called 20 times measures L2 bandwidth, not HBM's. Both mislead at batch 1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any


def l2_bytes() -> int:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 64 << 20)  # 64 MiB: more than any current card


def copies_past_l2(bytes_per_copy: int) -> int:
    """How many distinct copies of an operand of this size cycle through twice the L2 cache."""
    return max(1, math.ceil(2 * l2_bytes() / max(bytes_per_copy, 1)))


def graph_ms(
    fns: Sequence[Callable[[], Any]] | Callable[[], Any], calls: int = 24, replays: int = 10
) -> float:
    """Median milliseconds per call of a CUDA graph that makes `calls` calls, cycling through `fns`
    (one per operand copy; see copies_past_l2)."""
    import torch

    fns = list(fns) if isinstance(fns, Sequence) else [fns]
    calls = max(calls, len(fns))
    for fn in fns:  # compile / autotune outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def back_to_back_ms(fn: Callable[[], Any], device: Any, calls: int, reps: int = 1, warmup: int = 1) -> float:
    """Median over `reps` of the mean milliseconds of `calls` back-to-back calls of `fn`, after `warmup`
    calls (cuBLASLt picks its algorithm on the first): CUDA events around the calls on a GPU, the wall
    clock elsewhere. For what launch overhead cannot blur: a CUDA graph's replay, or a GEMM of
    thousands of rows; a small kernel wants graph_ms."""
    import time

    import torch

    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
        else:
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - t) * 1e3 / calls)
    return statistics.median(samples)


def rel_err(out: Any, ref: Any) -> float:
    """||out - ref|| / ||ref|| in float64: how far a timed variant's result is from its reference (NaN
    when out holds a NaN, e.g. a split-K race), so a sweep never picks a wrong variant."""
    out, ref = out.double(), ref.double()
    if out.isnan().any():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def variant_us(fns: Sequence[Callable[[], Any]] | Callable[[], Any], smoke: bool) -> float:
    """Microseconds per call as graph_ms measures them; under a sweep's CPU smoke mode (the Triton
    interpreter) the wall time of one call, which exercises the selection and measures nothing."""
    if smoke:
        import time

        fn = fns[0] if isinstance(fns, Sequence) else fns
        start = time.perf_counter()
        fn()
        return round((time.perf_counter() - start) * 1e6, 2)
    return round(graph_ms(fns) * 1e3, 2)


def kernel_timer(
    row: dict[str, Any], expected: Any, bytes_read: int, bandwidth: float, tag: str
) -> Callable[..., None]:
    """timed(name, fns, out, expected=expected, bytes_read=bytes_read): graph_ms of `fns` into row[name] as
    microseconds, the fraction of `bandwidth` its bytes reach and `out`'s error against `expected`, printed
    after `tag` (the kernel probes' one way of recording a variant: peer_w4_gemv.py, probe_tinygemm.py)."""

    def timed(name: str, fns: list, out: Any, expected: Any = expected, bytes_read: int = bytes_read) -> None:
        t = graph_ms(fns)
        row[name] = {"us": round(t * 1e3, 2), "bw": round(bytes_read / (t / 1e3) / bandwidth, 3),
                     "err": round(rel_err(out, expected), 5)}  # fmt: skip
        print(f"{tag} {name}: {row[name]}", flush=True)

    return timed
