"""The executor a resolved config asks for: the in-process runner, or tensor-parallel workers."""

from __future__ import annotations

from engine.config import ResolvedConfig
from engine.executor.executor import Executor, UniprocExecutor


def create_executor(config: ResolvedConfig) -> Executor:
    parallel = config.parallel
    if parallel.tensor_parallel_size == 1:
        return UniprocExecutor(config)
    if parallel.distributed_executor_backend == "ray":
        from engine.executor.ray_executor import RayExecutor  # noqa: PLC0415 (ray is optional)

        return RayExecutor(config)
    from engine.executor.multiproc_executor import MultiprocExecutor  # noqa: PLC0415

    return MultiprocExecutor(config)
