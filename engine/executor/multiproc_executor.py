"""Tensor parallelism on one node: one spawned worker process per rank (engine/executor/worker_process.py),
each holding its shard of the model and of the KV cache (engine/worker/worker.py).

Per step the engine encodes the compact SchedulerOutput once as msgpack (engine/executor/step_codec.py:
new requests in full, running ones as a diff; no pickle) and copies the bytes into one slot of a
shared-memory ring that every rank reads (engine/executor/shm_broadcast.py: one copy for all ranks, not
one pipe write per rank; `tp_broadcast_slots` slots of `tp_broadcast_slot_bytes`); the ranks run
the step together, meeting in the layers' collectives (NCCL on CUDA, gloo on CPU), and rank 0's
ModelRunnerOutput comes back on its pipe (msgpack too). A launch is one write into the ring and no reply, so with
async scheduling the engine launches step N+1 and then waits for step N's replies. Control calls
(load, profile, adapters, shutdown; pickled) and a step larger than a slot (logged once) keep their
place in the ring as a marker and travel down every rank's pipe; the pipes also carry every reply.

Supervision: every wait watches the workers' process sentinels and has a deadline (`timeout_s`, also
the process group's collective timeout). A worker that dies, fails or does not answer in time makes
every later call raise `WorkerFailedError`, which the step pipeline treats as fatal: the engine stops,
its in-flight requests get an error, /health turns 503. A write that finds the ring full waits for the
lagging rank under the same deadline and fails at once if that rank has died. shutdown() asks the
workers to stop, then terminates and finally kills whichever remain, so no process outlives the
engine, and unlinks the ring's shared memory (after a crash of the engine process, multiprocessing's
resource tracker unlinks it once the workers have exited).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections import Counter
from multiprocessing.connection import Connection, wait
from typing import Any

from engine.config import ResolvedConfig
from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.executor import step_codec
from engine.executor.executor import Executor
from engine.executor.rendezvous import start_store
from engine.executor.shm_broadcast import (
    BroadcastWriter,
    ChannelTimeout,
    ReaderGoneError,
    free_shm_bytes,
    segment_bytes,
)
from engine.executor.worker_process import STEP_CALLS, rebuild_exception, worker_main
from engine.lora.request import LoRARequest

logger = logging.getLogger("weir.engine")


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable `name` (unset or empty: default)."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value > 0:  # (NaN too)
        raise ValueError(f"{name} must be a positive number of seconds; got {raw!r}")
    return value


# Seconds a step (or a collective inside it) may take before the engine gives up on the workers.
DEFAULT_TIMEOUT_S = seconds_from_env("WEIR_TP_TIMEOUT_S", 300.0)
# Start-up (weights load, memory profile, graph capture) may take much longer than a step.
STARTUP_TIMEOUT_S = seconds_from_env("WEIR_TP_STARTUP_TIMEOUT_S", 1800.0)
# How long shutdown() waits for a free slot to ask the workers to stop before it terminates them.
_SHUTDOWN_WRITE_S = 5.0


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died, failed or hung: the ranks can no longer run steps."""

    fatal = True  # engine.executor.step_pipeline.is_fatal


class MultiprocExecutor(Executor):
    """Ranks as worker processes. Its step handles are step ids."""

    def __init__(self, config: ResolvedConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.world_size = config.parallel.tensor_parallel_size
        self.timeout_s = timeout_s
        self.failed: WorkerFailedError | None = None
        self._next_step_id = 0
        # One conversation at a time on the pipes: a call's replies must reach the thread that asked
        # (the async engine loads adapters on a thread of its own while its worker thread steps).
        self._lock = threading.Lock()
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[Connection] = []
        # Messages sent per path ("shm": in a slot of the ring, "pipe": down every rank's pipe).
        self.sent: Counter[str] = Counter()
        context = multiprocessing.get_context("spawn")
        # The process group's rendezvous, held here while the workers run (rendezvous.py says why).
        self._store: object | None
        self._store, init_method = start_store("127.0.0.1", timeout_s)
        log_level = logging.getLogger("weir").getEffectiveLevel()
        on_cuda = config.device.device == "cuda"
        slots, slot_bytes = config.parallel.tp_broadcast_slots, config.parallel.tp_broadcast_slot_bytes
        _check_ring_fits(slots, slot_bytes, self.world_size)
        self._channel = BroadcastWriter(
            self.world_size, num_slots=slots, slot_bytes=slot_bytes, context=context
        )
        self._warned_overflow = False  # a step larger than a slot is logged once
        # Ends the workers and unlinks the ring also when the executor is dropped without shutdown()
        # (the lists are shared).
        self._finalizer = weakref.finalize(self, _stop_processes, self._processes, self._conns, self._channel)
        try:
            for rank in range(self.world_size):
                parent_end, child_end = context.Pipe(duplex=True)
                process = context.Process(
                    target=worker_main,
                    args=(
                        config,
                        rank,
                        rank if on_cuda else None,
                        init_method,
                        timeout_s,
                        child_end,
                        self._channel.handle,
                        log_level,
                    ),
                    name=f"weir-tp{rank}",
                    daemon=True,  # also ended by multiprocessing's exit handler if shutdown() never ran
                )
                process.start()
                child_end.close()
                self._processes.append(process)
                self._conns.append(parent_end)
            self._gather(STARTUP_TIMEOUT_S, "start")
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            "tensor parallelism: %d worker processes (pids %s), %s",
            self.world_size,
            ", ".join(str(p.pid) for p in self._processes),
            "nccl" if on_cuda else "gloo",
        )

    @property
    def is_healthy(self) -> bool:
        """Also false as soon as a worker process has exited, before any step notices."""
        return self.failed is None and all(p.is_alive() for p in self._processes)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    # ------------------------------------------------------------------ Executor
    def startup_timings(self) -> dict[str, float]:
        return self._call("startup_timings", (), STARTUP_TIMEOUT_S)[0]

    def determine_num_kv_blocks(self) -> int:
        # Each rank profiles its own device; the cache is as large as the tightest rank allows.
        return min(self._call("determine_num_kv_blocks", (), STARTUP_TIMEOUT_S))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call("initialize_kv_cache", (num_blocks,), STARTUP_TIMEOUT_S)

    def launch(self, scheduler_output: SchedulerOutput, previous: int | None) -> int:
        with self._lock:
            step_id = self._next_step_id
            self._next_step_id += 1
            self._broadcast(
                "launch", step_codec.encode_launch(step_id, scheduler_output, previous), self.timeout_s
            )
        return step_id

    def collect(self, launched: int) -> ModelRunnerOutput:
        with self._lock:
            self._broadcast("collect", step_codec.encode_collect(launched), self.timeout_s)
            output = self._gather(self.timeout_s, f"step {launched}")[0]
        assert isinstance(output, ModelRunnerOutput)
        return output

    def shutdown(self) -> None:
        """Ask every worker to stop, then terminate (and kill) any still running. Idempotent."""
        # Politely only when no other thread is mid-call (else its bytes and ours could interleave).
        if self._processes and self.failed is None and self._lock.acquire(timeout=5.0):
            try:
                self._broadcast("shutdown", step_codec.encode_control("shutdown", ()), _SHUTDOWN_WRITE_S)
            except WorkerFailedError:
                pass
            finally:
                self._lock.release()
        if self.failed is not None:  # the survivors may be stuck in a collective (or stopped)
            for process in self._processes:
                if process.is_alive():
                    process.kill()
        self._finalizer()
        self._store = None  # the rendezvous's server stops: no worker is left to use it

    def add_lora(self, lora_request: LoRARequest) -> None:
        self._call("add_lora", (lora_request,), self.timeout_s)

    def remove_lora(self, lora_int_id: int) -> bool:
        return bool(self._call("remove_lora", (lora_int_id,), self.timeout_s)[0])

    # ------------------------------------------------------------------ the pipes
    def _call(self, method: str, args: tuple, timeout_s: float) -> list[Any]:
        with self._lock:
            self._broadcast(method, step_codec.encode_control(method, args), timeout_s)
            return self._gather(timeout_s, method)

    def _broadcast(self, method: str, frame: bytes | bytearray, timeout_s: float) -> None:
        """The same bytes to every rank, encoded once (engine/executor/step_codec.py): a step's
        message into one slot of the ring that every rank reads; a control call, or a step larger
        than a slot, as a marker in the ring (which keeps the order) and the bytes down every rank's
        pipe."""
        if self.failed is not None:
            raise self.failed
        step = method in STEP_CALLS
        try:
            inline = self._channel.write(frame, timeout_s, inline=step, reader_gone=self._is_dead)
        except ReaderGoneError as exc:
            rank = exc.reader
            raise self._fail(self._death_of(rank, grace_s=1.0) or f"rank {rank} exited") from None
        except ChannelTimeout as exc:
            raise self._fail(f"rank {exc.reader} did not take {method} within {timeout_s:.0f} s") from None
        self.sent["shm" if inline else "pipe"] += 1
        if inline:
            return
        if step and not self._warned_overflow:
            self._warned_overflow = True
            logger.warning(
                "a step's message of %d bytes exceeds tp_broadcast_slot_bytes (%d): it and any like it "
                "go down every rank's pipe instead of the shared-memory ring (slower); raise "
                "--tp-broadcast-slot-bytes if this is common",
                len(frame),
                self._channel.geometry.slot_bytes,
            )
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(frame)
            except OSError as exc:
                raise self._fail(self._death_of(rank) or f"rank {rank}'s pipe broke ({exc})") from None

    def _gather(self, timeout_s: float, what: str) -> list[Any]:
        """Every rank's reply, in rank order; raises WorkerFailedError on a death, an error or the
        deadline."""
        replies: dict[int, Any] = {}
        invalid: BaseException | None = None
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._processes)}
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            ready = wait([*pending, *sentinels], timeout=max(remaining, 0.0)) if remaining > 0 else []
            if not ready:
                raise self._fail(
                    f"rank(s) {sorted(pending.values())} did not answer {what} within {timeout_s:.0f} s"
                )
            for obj in ready:
                if obj in sentinels and obj not in pending:
                    rank = sentinels[obj]
                    # The sentinel fires as the process closes its fds, a moment before it can be reaped.
                    raise self._fail(self._death_of(rank, grace_s=1.0) or f"rank {rank} exited")
            for obj in ready:
                rank = pending.pop(obj, None)  # type: ignore[call-overload]
                if rank is None:
                    continue
                try:
                    status, value = step_codec.decode_reply(obj.recv_bytes())  # type: ignore[union-attr]
                except (EOFError, OSError):
                    raise self._fail(
                        self._death_of(rank, grace_s=1.0) or f"rank {rank}'s pipe closed"
                    ) from None
                if status == "invalid":  # the caller's error, raised once every rank has answered
                    invalid = invalid or rebuild_exception(value)
                    replies[rank] = None
                    continue
                if status != "ok":
                    # A collective failing because a peer died reports the death, not the symptom.
                    dead = next((m for r in range(self.world_size) if (m := self._death_of(r, 1.0))), None)
                    raise self._fail(dead or f"rank {rank} failed during {what}:\n{value}")
                replies[rank] = value
        if invalid is not None:
            raise invalid
        return [replies[rank] for rank in range(self.world_size)]

    def _is_dead(self, rank: int) -> bool:
        return not self._processes[rank].is_alive()

    def _death_of(self, rank: int, grace_s: float = 0.0) -> str | None:
        process = self._processes[rank]
        process.join(grace_s)
        if process.is_alive():
            return None
        return (
            f"tensor-parallel worker rank {rank} (pid {process.pid}) died with exit code {process.exitcode}"
        )

    def _fail(self, reason: str) -> WorkerFailedError:
        if self.failed is None:
            self.failed = WorkerFailedError(reason)
            logger.error("tensor-parallel workers failed: %s", reason)
        return self.failed


def _check_ring_fits(slots: int, slot_bytes: int, world_size: int) -> None:
    """Refuse a ring larger than /dev/shm's free space at start, naming the options (a write past it
    would kill the engine with SIGBUS mid-serving)."""
    need = segment_bytes(slots, slot_bytes, world_size)
    free = free_shm_bytes()
    if free is not None and need > free:
        raise ValueError(
            f"the tensor-parallel broadcast ring needs {need} bytes of shared memory (tp_broadcast_slots "
            f"{slots} x tp_broadcast_slot_bytes {slot_bytes}), /dev/shm has {free} free; lower them or "
            f"give the container more shared memory (docker run --shm-size)"
        )


def _stop_processes(
    processes: list[multiprocessing.process.BaseProcess],
    conns: list[Connection],
    channel: BroadcastWriter,
) -> None:
    """Wait a little for workers asked to stop, then terminate, then kill. Empties both lists and
    unlinks the ring."""
    deadline = time.monotonic() + 10.0
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0.0))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()
    processes.clear()
    conns.clear()
    channel.close()
