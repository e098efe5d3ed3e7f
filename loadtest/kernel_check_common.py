"""What loadtest/gpu_kernel_check.py and its part modules (kernel_check_moe.py, kernel_check_families.py)
share: NaN-poisoned outputs, checks against a reference recorded into the check's results, paged
batches, and a timing that is CUDA-graph replays on a GPU and one wall-clock call under the CPU smoke
run (the Triton interpreter: it exercises the code and measures nothing)."""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from loadtest.gpu_timing import graph_ms, rel_err

BF16 = torch.bfloat16


class Poisoned:
    """torch.empty / empty_like hand out NaN-filled float tensors while active: an output element a
    kernel forgets to write stays NaN and fails every comparison."""

    def __enter__(self) -> None:
        self.orig = torch.empty, torch.empty_like

        def poison(t: torch.Tensor) -> torch.Tensor:
            return t.fill_(float("nan")) if t.is_floating_point() else t

        e, el = self.orig
        torch.empty = lambda *a, **k: poison(e(*a, **k))
        torch.empty_like = lambda *a, **k: poison(el(*a, **k))

    def __exit__(self, *exc: object) -> None:
        torch.empty, torch.empty_like = self.orig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def env_switch(name: str, on: bool) -> Iterator[None]:
    """The switch `name` (ops.env_flags, read at each call) set to 1 / 0 while active, then put back."""
    before = os.environ.get(name)
    os.environ[name] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def check_close(
    results: dict, name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2, **detail: Any
) -> bool:
    """||out - ref|| / ||ref|| < tol (NaN fails), recorded in results["checks"] and printed."""
    sync(out.device)
    err = rel_err(out, ref)
    ok = err < tol
    results["checks"].append({"name": name, "rel_err": err, "tol": tol, "ok": ok, **detail})
    print(f"  {'PASS' if ok else 'FAIL'} {name}: rel_err={err:.2e} (tol {tol:g})", flush=True)
    return ok


def check_true(results: dict, name: str, ok: bool, **detail: Any) -> bool:
    results["checks"].append({"name": name, "ok": bool(ok), **detail})
    extra = "".join(f" {k}={v}" for k, v in detail.items())
    print(f"  {'PASS' if ok else 'FAIL'} {name}{extra}", flush=True)
    return bool(ok)


def guarded(results: dict, label: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run one sub-check; an exception (a kernel that fails to compile or launch at this shape, a
    capture that fails) is a FAIL and an error line, and the part goes on with the next one."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        msg = f"{label}: {type(exc).__name__}: {str(exc)[:300]}"
        results["errors"].append(msg)
        results["checks"].append({"name": f"{label}: ran", "ok": False, "error": msg})
        print(f"  FAIL {msg}", flush=True)


def time_ms(fns: Sequence[Callable[[], Any]] | Callable[[], Any], device: torch.device) -> float:
    """Milliseconds per call: CUDA-graph replays cycling over `fns` (loadtest/gpu_timing.py) on a GPU;
    on CPU (smoke) the wall time of one call of the first."""
    if device.type == "cuda":
        return graph_ms(fns)
    fn = fns[0] if isinstance(fns, Sequence) else fns
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def eager_ms(fn: Callable[[], Any], device: torch.device, reps: int = 10) -> float:
    """Median milliseconds of an eagerly launched call (for ops that sync the host and so cannot be
    captured), CUDA events around each; on CPU one wall-clock call."""
    if device.type != "cuda":
        return time_ms(fn, device)
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class Replay:
    """One capture of `fn` replayed after its inputs change in place: a CUDA graph on a GPU (warm-up on a
    side stream first, as the engine does), a plain re-run on CPU (the smoke run has no graphs, but
    walks the same steps)."""

    def __init__(self, fn: Callable[[], torch.Tensor], device: torch.device) -> None:
        self.fn, self.graph = fn, None
        if device.type != "cuda":
            self.out = fn()
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # compile and warm up outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            self.out = self.fn()
        else:
            self.graph.replay()
        return self.out


def make_paged(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = BF16,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    seed: int = 0,
    device: torch.device | str = "cuda",
) -> dict:
    """Paged batch with randomly placed physical blocks; garbage in unused block-table entries."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    total = sum(blocks_per_seq)
    if k_cache is None:
        shape = (total + 8, block_size, num_kv_heads, head_dim)
        k_cache = torch.randn(shape, device=device, dtype=dtype, generator=g)
        v_cache = torch.randn(shape, device=device, dtype=dtype, generator=g)
    assert v_cache is not None and k_cache.shape[0] >= total
    perm = torch.randperm(k_cache.shape[0], device=device, generator=g)[:total].int()
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.full((len(seq_lens), max_blocks), 2**30, dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = perm[used : used + n]
        used += n
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    return {
        "query": torch.randn(qsl[-1], num_heads, head_dim, device=device, dtype=dtype, generator=g),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": block_tables,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "query_start_loc": torch.tensor(qsl, dtype=torch.int32, device=device),
        "max_query_len": max(q_lens),
        "max_seq_len": max(seq_lens),
        "scale": head_dim**-0.5,
    }


def upcast(batch: dict) -> dict:
    """The batch with every float tensor in float32 (the reference's inputs)."""
    return {
        k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in batch.items()
    }
