"""The Triton kernels a start-up phase will compile, compiled side by side before it runs.

With the compile pool running (engine.worker.compile_pool, WEIR_COMPILE_WORKERS), a phase that runs
forwards (the memory profile, the CUDA-graph warm-ups) first runs a few of them dry: every Triton
launch that would compile records its specialization and returns without compiling or launching.
Those are compiled in the pool's processes at once while this process does what it can meanwhile;
then the phase runs for real and finds them in Triton's cache. A dry forward computes garbage (the
skipped kernels' outputs are left as allocated), which is harmless in the model's forwards: no
skipped kernel's output is used as an index (the MoE routing and alignment kernels' are, so they run
even dry, compile_pool.RUN_EVEN_DRY; the sampler's are, so the sampler never runs dry).

Off without the pool, on CPU and under the Triton interpreter (nothing compiles there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engine.worker import compile_pool

logger = logging.getLogger("weir.engine")

# How long to wait for the pool's compiles before compiling in-process instead (one takes ~1 s).
_WAIT_S = 120.0


def representative_sizes(sizes: list[int]) -> list[int]:
    """The step sizes a dry run covers, of a phase that runs every size in `sizes` (ascending): the
    powers of two and the largest. Triton specializes an int argument on == 1 and on divisibility by
    16, and the kernels' launch choices (split-KV, the batch-1 GEMV) change at small sizes; a size
    this misses only compiles in-process, as without the pool."""
    chosen = [s for s in sizes if s & (s - 1) == 0]
    if sizes and sizes[-1] not in chosen:
        chosen.append(sizes[-1])
    return chosen


def compile_ahead(
    phase: str,
    dry_forwards: list[Callable[[], object]],
    meanwhile: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Run `dry_forwards` dry, compile what they asked for in the pool, run `meanwhile` (real work
    that may compile kernels of its own, such as the sampler's) and wait for the pool.
    -> {"kernels", "failed", "dry_s", "wait_s", "longest_s"} (empty when the pool is not running)."""
    workers = compile_pool.running()
    if not workers:
        return {}
    start = time.perf_counter()
    try:
        with compile_pool.record_specializations() as specs:
            for forward in dry_forwards:
                forward()
    except Exception:  # the phase compiles in-process, as without the pool
        logger.warning("compile ahead (%s): the dry forwards failed", phase, exc_info=True)
        return {}
    try:
        futures = compile_pool.compile_specializations(specs, compile_pool.current_target())
    except Exception:  # a worker could not start (BrokenProcessPool): compile in-process
        logger.warning("compile ahead (%s): the compile pool is not usable", phase, exc_info=True)
        compile_pool.stop(terminate=True)
        return {}
    dry_s = time.perf_counter() - start
    if meanwhile is not None:
        meanwhile()
    waited = time.perf_counter()
    results, failed = [], []
    for spec, future in zip(specs, futures, strict=True):
        try:
            result = future.result(timeout=max(_WAIT_S - (time.perf_counter() - waited), 0.0))
        except Exception as exc:  # a worker died or took too long: that kernel compiles in-process
            failed.append(f"{spec.name}: {type(exc).__name__}")
            continue
        if result.error is not None:
            failed.append(f"{result.name}: {result.error[:200]}")
        results.append(result)
    wait_s = time.perf_counter() - waited
    longest = max(results, key=lambda r: r.seconds, default=None)
    logger.info(
        "compile ahead (%s): %d Triton kernels on %d workers, dry forwards %.2fs, waited %.2fs "
        "(longest %s %.2fs; launchers %d)%s",
        phase,
        len(specs),
        workers,
        dry_s,
        wait_s,
        longest.name if longest else "-",
        longest.seconds if longest else 0.0,
        sum(r.launcher_built for r in results),
        f"; not compiled there: {'; '.join(failed)}" if failed else "",
    )
    return {
        "kernels": float(len(specs)),
        "failed": float(len(failed)),
        "dry_s": dry_s,
        "wait_s": wait_s,
        "longest_s": longest.seconds if longest else 0.0,
    }
