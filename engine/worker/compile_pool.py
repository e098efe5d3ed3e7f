"""Start-up's Triton compiles in worker processes, side by side, instead of one after another.

On an empty Triton cache a start-up compiles ~10 kernel specializations in turn, 0.1-1.3 s each on
the H200 machine, and builds a C launcher per signature with gcc: U1 took 16.7 s there against 9.3 s
with a warm cache (README, issue 17). The compiles do not depend on each other, and the Python
front end holds the GIL, so threads do not overlap them; processes do.

- `start(workers)` spawns the workers early (`weir serve` calls it as soon as its settings say CUDA),
  so they import torch, triton and the kernels while the server imports its own.
- `record_specializations()`: inside it, a Triton launch that would compile records the
  specialization Triton serialises for its `jit_cache_hook` and returns without compiling or
  launching; the kernel's outputs keep whatever they held. engine.worker.compile_ahead runs the
  start-up forwards once this way.
- `compile_specializations(specs, target)`: each worker replays one with `JITFunction.preload`,
  Triton's own inverse of that serialisation, which compiles into the shared TRITON_CACHE_DIR, then
  builds the kernel's launcher (cached there too, by its source). The launches that follow in the
  server's process hit both: preload rebuilds the source, signature, constexprs, attributes and
  options the launch had, so the cache key is the same (tests/engine/test_compile_pool.py checks it).

Nothing depends on it for correctness: a specialization the workers missed or failed to compile is
compiled in the server's process, as without it. Import this module without importing torch or
triton (the CLI does, before either): the workers import them.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

ENV_WORKERS = "WEIR_COMPILE_WORKERS"

_pool: ProcessPoolExecutor | None = None
_pool_workers = 0


@dataclass(frozen=True)
class Specialization:
    """One compile a launch asked for: the kernel (a module-level `@triton.jit` function) and Triton's
    serialised specialization of it (JSON: signature, constexprs, attributes, options, cache key)."""

    module: str
    name: str
    data: str


@dataclass(frozen=True)
class CompileResult:
    name: str
    seconds: float
    error: str | None  # None: compiled
    launcher_built: bool  # its C launcher built too (needs the CUDA driver library)


# A start-up compiles ~10-15 specializations; each worker holds torch in memory (~0.5 GB).
MAX_WORKERS = 16

# (module, kernel) of the kernels whose outputs later kernels read as indices or lengths: a dry
# forward that left them as allocated would send those kernels out of bounds (the fused MoE kernel
# indexes experts' weights by the alignment kernel's block_expert and stops at its num_padded; the
# alignment, Triton's or torch's, counts and sorts the router's expert ids). They compile in this
# process and run for real even inside record_specializations().
RUN_EVEN_DRY = frozenset(
    {("ops.triton.moe_align", "_moe_align_kernel"), ("ops.triton.moe_route", "_moe_route_kernel")}
)


# `weir serve`'s default (an LLM in a user's script keeps 0: spawned workers need its
# `if __name__ == "__main__":`). With engine.worker.compile_marker a warm cache skips the pool.
SERVE_DEFAULT_WORKERS = 8


def workers_from_env(default: int = 0) -> int:
    """WEIR_COMPILE_WORKERS: how many compile workers start-up spawns (unset: `default`; 0: none), at
    most the CPUs this process may run on (usable_cpus) and MAX_WORKERS."""
    raw = os.environ.get(ENV_WORKERS, "").strip() or str(default)
    try:
        workers = int(raw)
    except ValueError:
        workers = -1
    if workers < 0:
        raise ValueError(f"{ENV_WORKERS} must be a whole number >= 0 (0: off); got {raw!r}")
    return min(workers, usable_cpus(), MAX_WORKERS)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's cpuset, where os.cpu_count() would
    say the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def gpu_likely(device: str) -> bool:
    """Whether an engine of `device` ("cuda", "cpu", "auto") will run on an NVIDIA GPU, guessed without
    importing torch (the pool starts before it): "auto" counts when the NVIDIA driver's device node
    exists and CUDA_VISIBLE_DEVICES hides none of it. A wrong guess costs the workers' CPU time: the
    runner only uses the pool on CUDA, and stops it after start-up either way."""
    if device != "auto":
        return device == "cuda"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip()
    return os.path.exists("/dev/nvidiactl") and visible not in ("", "-1")


def start(workers: int) -> bool:
    """Spawn `workers` processes (none if 0 or already running) and have each import what it
    compiles with, now, so that they are ready when the first specializations come. -> running."""
    global _pool, _pool_workers
    if _pool is not None or workers <= 0:
        return _pool is not None
    # spawn, not fork: the parent may already hold a CUDA context, which a forked child cannot use.
    _pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_import_compiler
    )
    _pool_workers = workers
    for _ in range(workers):  # a pool spawns a worker per task while none is idle: all of them, now
        _pool.submit(_ready)
    return True


def running() -> int:
    """How many workers the pool has (0: not started)."""
    return _pool_workers if _pool is not None else 0


def stop(terminate: bool = False) -> None:
    """Let the workers exit (their memory is freed); queued compiles are dropped. `terminate`: end
    them now (an error path, where they may still be importing for seconds and the process would
    wait for them at exit)."""
    global _pool, _pool_workers
    if _pool is not None:
        # The executor's own table of its processes (a private attribute, hence the default).
        processes = list((getattr(_pool, "_processes", None) or {}).values()) if terminate else []
        _pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
    _pool, _pool_workers = None, 0


@contextmanager
def record_specializations() -> Iterator[list[Specialization]]:
    """Inside: every Triton launch that would compile (not in its kernel's in-process cache) records
    its specialization and returns None at once: nothing compiles, nothing launches, outputs are left
    as allocated. Launches of kernels already compiled in this process, and of RUN_EVEN_DRY's (compiled
    here, not recorded), run as usual. The list yielded
    is filled, in first-seen order without repeats, when the block exits. The hook is process-wide
    while the block runs: start-up only, when no other thread launches Triton kernels."""
    from triton import knobs

    found: dict[str, Specialization] = {}

    def hook(**kwargs: Any) -> bool:
        fn = kwargs["fn"]  # triton's JitFunctionInfo: module, name (qualname), jit_function
        if (fn.module, fn.name) in RUN_EVEN_DRY:
            return False  # not handled: Triton compiles it here and launches it
        data = kwargs["compile"]["specialization_data"]
        found.setdefault(data, Specialization(fn.module, fn.name, data))
        return True  # handled: Triton neither compiles nor launches

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    recorded: list[Specialization] = []
    try:
        yield recorded
    finally:
        knobs.runtime.jit_cache_hook = previous
        recorded.extend(found.values())


def compile_specializations(
    specs: list[Specialization], target: tuple[str, int, int], build_launchers: bool = True
) -> list[Future[CompileResult]]:
    """Queue one compile per specialization on the running pool. `target`: (backend, arch, warp size)
    of the device the launches will run on (Triton's GPUTarget fields). `build_launchers`: also build
    each kernel's C launcher (needs the CUDA driver library, so off where there is none)."""
    if _pool is None:
        raise RuntimeError("compile_pool.start() first")
    return [_pool.submit(_compile, spec, target, build_launchers) for spec in specs]


def current_target() -> tuple[str, int, int]:
    """The active Triton driver's target, as compile_specializations takes it."""
    from triton.runtime import driver

    target = driver.active.get_current_target()
    return (target.backend, target.arch, target.warp_size)


# ------------------------------------------------------------------ in the workers
def _import_compiler() -> None:
    """Worker initializer: the driver first (on a cold cache its C helpers are built with gcc here, and
    the server's process, which needs them too, finds them sooner), then the kernels' modules."""
    _load_driver()

    import ops.triton  # noqa: F401 - the kernels most start-ups compile


def _ready() -> None:
    """A no-op task: submitting one per worker makes the pool spawn them all now."""


_driver: Any = None  # this process's Triton driver, once loaded
_driver_builds_launchers = False


def _load_driver() -> Any:
    """The CUDA driver (it builds launchers; loading it touches no GPU), or where its library is
    missing a stand-in that only answers device queries."""
    global _driver, _driver_builds_launchers
    if _driver is None:
        try:
            from triton.backends.nvidia.driver import CudaDriver

            _driver, _driver_builds_launchers = CudaDriver(), True
        except Exception:  # no libcuda here: compile only; the server's process builds the launchers
            _driver = _TargetOnlyDriver()
    return _driver


def _use_target(target: tuple[str, int, int]) -> bool:
    """Make Triton compile for `target` without touching a GPU: the driver's device queries answered
    from `target`. -> whether launchers can be built here."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    active = _load_driver()
    gpu_target = GPUTarget(*target)
    active.get_current_device = lambda: 0
    active.get_current_target = lambda: gpu_target
    driver.set_active(active)
    return _driver_builds_launchers


class _TargetOnlyDriver:
    """What a launch without a GPU asks of a driver before its compile (tests)."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


def _compile(spec: Specialization, target: tuple[str, int, int], build_launcher: bool) -> CompileResult:
    start_time = time.perf_counter()
    launcher = False
    try:
        launcher = _use_target(target) and build_launcher
        fn: Any = importlib.import_module(spec.module)
        for part in spec.name.split("."):
            fn = getattr(fn, part)
        kernel = fn.preload(spec.data)
        if launcher:
            from triton.runtime import driver

            driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception as exc:  # reported, not raised: the server's process compiles it as before
        return CompileResult(
            spec.name, time.perf_counter() - start_time, f"{type(exc).__name__}: {exc}", False
        )
    return CompileResult(spec.name, time.perf_counter() - start_time, None, launcher)
