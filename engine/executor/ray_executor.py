"""Tensor parallelism on a Ray cluster: one Ray actor per rank (one per GPU, or per CPU with
--device cpu), placed by a placement group across the cluster's nodes (`ray start --head` on one,
`ray start --address HEAD:6379` on the others, then `weir serve ... --distributed-executor-backend
ray` on the head).

The actors run the same Worker as the worker processes (engine/worker/worker.py) and meet in the same
collectives (NCCL, gloo on CPU), with rank 0's node address as the rendezvous. Each step's call is put
into Ray's object store once, as msgpack bytes (engine/executor/step_codec.py), and every actor reads it; an actor runs its calls in order, so a launch
needs no reply and a collect waits for every rank. Supervision as in the multi-process executor: an
actor that dies, raises or does not answer within the timeout makes every later call raise
WorkerFailedError (fatal). shutdown() kills the actors and removes the placement group; a local Ray
instance this executor started is stopped with it.

Ray is optional: `pip install weir[ray]`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from engine.config import ResolvedConfig
from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.errors import InvalidRequestError
from engine.executor.executor import Executor
from engine.executor.multiproc_executor import (
    DEFAULT_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    WorkerFailedError,
)
from engine.executor.step_codec import (
    decode_call,
    decode_reply,
    encode_collect,
    encode_launch,
    encode_step_reply,
)
from engine.executor.worker_process import REQUEST_CALLS, exception_state, rebuild_exception
from engine.lora.request import LoRARequest

logger = logging.getLogger("weir.engine")


class RayWorker:
    """The actor: one rank's Worker, built once the rendezvous address is known."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.store: Any = None  # rank 0's: the rendezvous's server, held while the actor lives

    def rendezvous_address(self, timeout_s: float) -> str:
        """Rank 0: start the process group's rendezvous on this node (engine/executor/rendezvous.py)
        and return its address, which every rank joins."""
        import ray  # noqa: PLC0415

        from engine.executor.rendezvous import start_store  # noqa: PLC0415

        self.store, address = start_store(ray.util.get_node_ip_address(), timeout_s)
        return address

    def start(self, config: ResolvedConfig, rank: int, init_method: str, timeout_s: float) -> None:
        from engine.worker.worker import Worker, init_distributed  # noqa: PLC0415

        # Ray shows each GPU actor only its own GPU (CUDA_VISIBLE_DEVICES): device 0.
        device_index = 0 if config.device.device == "cuda" else None
        init_distributed(config, rank, device_index, init_method, timeout_s)
        self.worker = Worker(config, rank, device_index)

    def call(self, message: tuple | bytes) -> Any:
        """A control call as `(method, args)`; a step's launch or collect as a msgpack frame
        (engine/executor/step_codec.py), whose collect answers a frame too."""
        if isinstance(message, bytes):
            method, args = decode_call(message)
            result = getattr(self.worker, method)(*args)
            return bytes(encode_step_reply(result)) if method == "collect" else None
        method, args = message
        if method == "shutdown":
            self.worker.shutdown()
            return None
        if method in REQUEST_CALLS:  # the caller's error comes back as data, to be raised there
            try:
                return ("ok", getattr(self.worker, method)(*args))
            except InvalidRequestError as exc:
                return ("invalid", exception_state(exc))
        return getattr(self.worker, method)(*args)


class RayExecutor(Executor):
    """Ranks as Ray actors. Its step handles are step ids."""

    def __init__(self, config: ResolvedConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        try:
            import ray  # noqa: PLC0415
            from ray.util.placement_group import placement_group  # noqa: PLC0415
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: PLC0415
        except ImportError:
            raise ValueError(
                "distributed_executor_backend 'ray' needs Ray: pip install 'weir[ray]'"
            ) from None
        self._ray = ray
        self.world_size = config.parallel.tensor_parallel_size
        self.timeout_s = timeout_s
        self.failed: WorkerFailedError | None = None
        self._next_step_id = 0
        self._actors: list[Any] = []
        self._placement_group: Any = None
        # Joins the cluster named by RAY_ADDRESS or started with `ray start` on this node; else starts
        # a local instance (stopped again at shutdown).
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
        on_cuda = config.device.device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if on_cuda else {"CPU": 1}
        try:
            self._placement_group = placement_group([bundle] * self.world_size, strategy="PACK")
            try:
                ray.get(self._placement_group.ready(), timeout=STARTUP_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise ValueError(
                    f"tensor_parallel_size {self.world_size} needs {self.world_size} x {bundle} on the Ray "
                    f"cluster; it has {ray.cluster_resources()}"
                ) from None
            actor_cls = ray.remote(RayWorker)
            for rank in range(self.world_size):
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=self._placement_group, placement_group_bundle_index=rank
                )
                options: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": strategy}
                if on_cuda:
                    options["num_gpus"] = 1
                self._actors.append(actor_cls.options(**options).remote())
            init_method = self._get(
                [self._actors[0].rendezvous_address.remote(timeout_s)], STARTUP_TIMEOUT_S, "start"
            )[0]
            self._get(
                [a.start.remote(config, rank, init_method, timeout_s) for rank, a in enumerate(self._actors)],
                STARTUP_TIMEOUT_S,
                "start",
            )
        except BaseException:
            self.shutdown()
            raise
        logger.info("tensor parallelism: %d Ray actors, %s", self.world_size, "nccl" if on_cuda else "gloo")

    @property
    def is_healthy(self) -> bool:
        return self.failed is None

    # ------------------------------------------------------------------ Executor
    def startup_timings(self) -> dict[str, float]:
        return self._call(("startup_timings", ()), STARTUP_TIMEOUT_S)[0]

    def determine_num_kv_blocks(self) -> int:
        return min(self._call(("determine_num_kv_blocks", ()), STARTUP_TIMEOUT_S))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call(("initialize_kv_cache", (num_blocks,)), STARTUP_TIMEOUT_S)

    def launch(self, scheduler_output: SchedulerOutput, previous: int | None) -> int:
        if self.failed is not None:
            raise self.failed
        step_id = self._next_step_id
        self._next_step_id += 1
        # msgpack bytes, not the dataclasses: Ray's serializer only copies them (no pickle walk).
        message = self._ray.put(bytes(encode_launch(step_id, scheduler_output, previous)))
        for actor in self._actors:
            actor.call.remote(message)  # errors surface at this step's collect
        return step_id

    def add_lora(self, lora_request: LoRARequest) -> None:
        self._request_call(("add_lora", (lora_request,)))

    def remove_lora(self, lora_int_id: int) -> bool:
        return bool(self._request_call(("remove_lora", (lora_int_id,))))

    def _request_call(self, message: tuple) -> Any:
        replies = self._call(message, self.timeout_s)
        invalid = next((value for status, value in replies if status == "invalid"), None)
        if invalid is not None:
            raise rebuild_exception(invalid)
        return replies[0][1]

    def collect(self, launched: int) -> ModelRunnerOutput:
        frames = self._call(bytes(encode_collect(launched)), self.timeout_s, "collect")
        output = decode_reply(frames[0])[1]
        assert isinstance(output, ModelRunnerOutput)
        return output

    def shutdown(self) -> None:
        """Kill the actors, remove the placement group, stop a Ray instance started here. Idempotent."""
        ray = self._ray
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        if self._placement_group is not None:
            from ray.util.placement_group import remove_placement_group  # noqa: PLC0415

            remove_placement_group(self._placement_group)
            self._placement_group = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    # ------------------------------------------------------------------ calls
    def _call(self, message: tuple | bytes, timeout_s: float, what: str | None = None) -> list[Any]:
        if self.failed is not None:
            raise self.failed
        if what is None:
            what = message[0] if isinstance(message, tuple) else "a step"
        ref = self._ray.put(message)
        return self._get([actor.call.remote(ref) for actor in self._actors], timeout_s, what)

    def _get(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        ray = self._ray
        deadline = time.monotonic() + timeout_s
        results: dict[Any, Any] = {}
        pending = list(refs)
        try:
            # One at a time as they finish: a dead rank is reported at once, not after its peers'
            # collectives time out waiting for it.
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
                if not ready:
                    raise ray.exceptions.GetTimeoutError()
                results[ready[0]] = ray.get(ready[0])
            return [results[ref] for ref in refs]
        except ray.exceptions.GetTimeoutError:
            reason = f"Ray actors did not answer {what} within {timeout_s:.0f} s"
        except ray.exceptions.RayActorError as exc:
            reason = f"a tensor-parallel Ray actor died during {what}: {exc}"
        except ray.exceptions.RayTaskError as exc:
            reason = f"a tensor-parallel Ray actor failed during {what}:\n{exc}"
        if self.failed is None:
            self.failed = WorkerFailedError(reason)
            logger.error("tensor-parallel workers failed: %s", reason)
        raise self.failed
