"""The async engine: a step-loop coroutine on the event loop, the forward pass on a worker thread.

    event loop                              worker thread ("weir-gpu")
    ----------                              --------------------------
    add_request -> scheduler queue
    step loop:  schedule()          ─────►  execute(scheduler_output)   (model forward + sampling)
                update() + detokenize ◄────
                per-request channels ──► async generators ──► SSE

Bookkeeping (scheduler, detokenizers, request channels) is only touched on the event loop, so it needs
no locks; the worker thread only runs the device half of the engine's step pipeline
(engine/executor/step_pipeline.py: launch step N+1, wait for step N). Cancelling a request's stream
aborts it at once, and its KV blocks are freed before the next step is scheduled.

Lifetime: the step-loop task holds the engine strongly only while there is work; parked waiting for
work it holds a weak reference, so dropping the last reference to a started engine (nothing in
flight) frees the model and KV cache by reference counting, with no cycle left for the garbage
collector. A finalizer then wakes the loop, which finds the engine gone and ends, and shuts down the
worker thread. `shutdown()` (or `async with`) remains the way to stop one deliberately.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.config import EngineConfig
from engine.core.sampling_params import SamplingParams
from engine.errors import EngineDeadError, EngineDrainingError, EngineShutdownError, QueueFullError
from engine.executor.step_loop_times import StepLoopTimes
from engine.executor.step_pipeline import StepWork
from engine.inputs.input_processor import check_request_types
from engine.llm_engine import LLMEngine
from engine.lora.request import LoRARequest
from engine.outputs.output_channel import OutputChannel
from engine.outputs.request_output import RequestOutput
from engine.protocol import EngineStats
from engine.startup_phases import StartupPhases

__all__ = ["AsyncEngine", "EngineStats"]

logger = logging.getLogger("weir.engine")


class RequestStream:
    """AsyncEngine.add_request's output stream. `async for` reads the async generator itself (no layer
    per token); aclose() also aborts a request whose stream was never read. An async generator closed
    before its first step runs none of its body, so `_stream`'s finally never aborted such a request:
    a request added and closed unread (a multi-prompt completion whose second prompt the engine
    refused, answered 400) ran on to max_tokens, its outputs piling up in a channel nobody read."""

    __slots__ = ("_gen", "_engine", "_request_id", "_channel")

    def __init__(
        self,
        gen: AsyncIterator[RequestOutput],
        engine: AsyncEngine,
        request_id: str,
        channel: OutputChannel[RequestOutput | BaseException],
    ) -> None:
        self._gen = gen
        self._engine = engine
        self._request_id = request_id
        self._channel = channel

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._gen

    def __anext__(self) -> Any:
        return self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()  # type: ignore[attr-defined]
        self._engine._forget_unread(self._request_id, self._channel)


class AsyncEngine:
    def __init__(self, config: EngineConfig, startup_phases: StartupPhases | None = None) -> None:
        """Loads the model and tokenizer and allocates the KV cache (blocking, seconds).
        `startup_phases`: where to record start-up's phases (`weir serve` passes the process's)."""
        self.engine = LLMEngine(config, startup_phases)
        self.startup_phases = self.engine.startup_phases
        self.config = self.engine.config  # resolved (engine/config.py)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.vocab_size
        self.model_path = config.model
        # generation_config.json's sampling values (SamplingParams names), for callers' defaults.
        self.generation_defaults = dict(self.engine.model_config.generation_defaults)
        self.max_waiting_requests = self.config.scheduler.max_waiting_requests
        self.max_waiting_tokens = self.config.scheduler.max_waiting_tokens
        self.warm = False
        self.dead_error: BaseException | None = None
        self._draining = False
        self._streams: dict[str, OutputChannel[RequestOutput | BaseException]] = {}
        self._work_available: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weir-gpu")
        # Dropped without shutdown(): the worker thread ends too (the finalizer must not refer to self).
        weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True).atexit = False
        # The engine's step phases; this loop adds idle and loop_delay (engine/step_loop_times.py).
        self.step_loop_times = self.engine.step_times
        self._worker_done = 0.0  # perf_counter when the worker last returned

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_healthy(self) -> bool:
        return (
            self.dead_error is None
            and (self._loop_task is None or not self._loop_task.done())
            and self.engine.executor.is_healthy  # a tensor-parallel worker may die while idle
        )

    @property
    def is_draining(self) -> bool:
        return self._draining

    async def start(self) -> None:
        """Warm up (one tiny generation, so kernels are compiled) and start the step loop."""
        if self._loop_task is not None:
            return
        self._work_available = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        loop = asyncio.get_running_loop()
        with self.startup_phases.phase("warmup"):
            await loop.run_in_executor(self._executor, self._warm_up)
        self._loop_task = asyncio.create_task(
            _step_loop(weakref.ref(self), self._work_available, self.step_loop_times),
            name="weir-step-loop",
        )
        # Dropped without shutdown(): wake the parked loop so that it sees the engine gone and ends.
        weakref.finalize(self, _wake, loop, self._work_available).atexit = False
        self.warm = True

    def _warm_up(self) -> None:
        engine = self.engine
        engine.add_request("__warmup__", [0], SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()

    def begin_drain(self) -> None:
        self._draining = True

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop taking requests, let in-flight ones finish for up to `timeout` s, abort the rest, stop,
        and free the model, KV cache and graphs at once, even while the engine is still referenced
        (`async with` calls it on exit). Dropping the last reference to an idle engine frees them
        too (see the module docstring)."""
        self.begin_drain()
        if self._idle is not None and self.engine.has_unfinished_requests():
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=max(timeout, 0.0))
            except TimeoutError:
                pass
        for out in self.engine.abort_all():
            self._deliver(out)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the loop's own errors were reported
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engine.shutdown()  # the model, KV cache and graphs go now (stats() still answers)

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # ------------------------------------------------------------------ requests
    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: SamplingParams,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Validate and enqueue; returns the request's output stream.

        Raises InvalidRequestError (a ValueError: bad input), QueueFullError, EngineDrainingError or EngineDeadError at once,
        before anything is queued. A `lora_request` not added yet is loaded first (add_lora; a bad
        adapter raises LoRAAdapterError, a ValueError).
        """
        if self.engine.is_shut_down:  # not "dead: None": shutdown() was called
            raise EngineShutdownError("the engine was shut down; build a new one to generate")
        if self.dead_error is not None or not self.is_healthy:
            raise EngineDeadError(f"the engine has stopped: {self.dead_error}")
        if self._loop_task is None:
            # Nothing would ever step the request: its stream would wait forever.
            raise RuntimeError(
                "the AsyncEngine is not started: await engine.start() (or use `async with AsyncEngine(...)`) "
                "before adding requests"
            )
        if self._draining:
            raise EngineDrainingError("the server is shutting down and takes no new requests")
        check_request_types(request_id, params, priority)  # before params is read below
        if params is None:
            params = SamplingParams()  # as LLMEngine.add_request
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stats = self.engine.scheduler
        bounds = self.config.scheduler
        # Larger than the queue itself: a ValueError (400), never a QueueFullError (429, retry) that
        # could not succeed. Each of the n (or best_of) sequences takes a place: it fits while
        # waiting + sequences <= bound.
        seqs = params.num_sequences
        field = "best_of" if seqs > params.n else "n"
        if seqs > bounds.max_waiting_requests:
            raise ValueError(
                f"{field} ({seqs}) is more than the waiting queue holds (max_waiting_requests "
                f"{bounds.max_waiting_requests}); the request could never be queued"
            )
        if stats.num_waiting + seqs > self.config.scheduler.max_waiting_requests:
            raise QueueFullError(
                f"the waiting queue is full ({stats.num_waiting} requests waiting; "
                f"max_waiting_requests is {self.config.scheduler.max_waiting_requests}); retry later"
            )
        request = self.engine.input_processor.process(
            request_id,
            prompt_token_ids if prompt_token_ids is not None else prompt or "",
            params,
            priority,
            prompt_text=prompt,
            lora_request=lora_request,
        )
        if lora_request is not None and not self.engine.has_lora(lora_request):
            await self.add_lora(lora_request)
            if request_id in self._streams:  # taken while the adapter loaded
                raise ValueError(f"request_id {request_id!r} is already in use")
        waiting = stats.num_waiting_tokens
        wanted = request.num_prompt_tokens * seqs
        if wanted > bounds.max_waiting_tokens:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens x {field} {seqs} = {wanted}, more than the "
                f"waiting queue holds (max_waiting_tokens {bounds.max_waiting_tokens}); it could never be queued"
            )
        if waiting + wanted > self.config.scheduler.max_waiting_tokens:
            raise QueueFullError(
                f"the waiting queue is full ({waiting} prompt tokens waiting + {wanted} requested "
                f"> max_waiting_tokens {self.config.scheduler.max_waiting_tokens}); retry later"
            )
        self.engine.add_engine_request(request)
        channel: OutputChannel[RequestOutput | BaseException] = OutputChannel()
        self._streams[request_id] = channel
        self._on_new_work()
        return RequestStream(self._stream(request_id, channel), self, request_id, channel)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Async generator of outputs; closing or cancelling it aborts the request."""
        if isinstance(prompt, str):
            stream = await self.add_request(request_id, prompt, None, params, priority, lora_request)
        else:
            stream = await self.add_request(request_id, None, list(prompt), params, priority, lora_request)
        async for out in stream:
            yield out

    async def _stream(
        self, request_id: str, channel: OutputChannel[RequestOutput | BaseException]
    ) -> AsyncIterator[RequestOutput]:
        finished = False
        get = channel.get
        try:
            while True:
                item = await get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.engine.abort_request(request_id)

    def _forget_unread(self, request_id: str, channel: OutputChannel[RequestOutput | BaseException]) -> None:
        """Abort a request whose stream was closed without being read (RequestStream.aclose); a no-op
        once its stream finished or was closed mid-read (the channel is gone, or is a later request's
        with the same id)."""
        if self._streams.get(request_id) is channel:
            del self._streams[request_id]
            self.engine.abort_request(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request (unknown ids are ignored; a non-str id is a TypeError, from
        LLMEngine.abort_request_with_output): its blocks are freed at once and its stream ends
        with a final output whose finish_reason is "abort" (as at shutdown). The stream used to be
        dropped without a word, so whoever was reading it waited forever."""
        final = self.engine.abort_request_with_output(request_id)
        channel = self._streams.pop(request_id, None)
        if channel is not None and final is not None:
            channel.put(final)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ------------------------------------------------------------------ LoRA adapters
    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and check an adapter so requests can name it (LLMEngine.add_lora: False if it is
        loaded already; LoRAAdapterError for a bad one). The load (reading and checking the file)
        runs on a thread of its own: neither the event loop nor the steps on the worker thread wait
        for it (the runner's adapter cache is locked only to insert it)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Unregister an adapter (False: none such); requests running on it finish, new ones naming
        it load it again."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.engine.remove_lora, lora_int_id)

    def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    # ------------------------------------------------------------------ the step loop
    def _on_new_work(self) -> None:
        if self._work_available is not None:
            self._work_available.set()
        if self._idle is not None:
            self._idle.clear()

    def _deliver(self, out: RequestOutput) -> None:
        channel = self._streams.get(out.request_id)
        if channel is not None:
            channel.put(out)

    async def _trip(self, loop: asyncio.AbstractEventLoop, work: StepWork) -> None:
        """One trip to the device: its device half on the worker thread, then the results applied and
        handed to their streams on the loop (both count as update). Raises a fatal device error once
        the affected requests have heard of it."""
        pipeline = self.engine.pipeline
        await self._in_worker(loop, pipeline.run_device, work)
        outputs = pipeline.complete(work, self.engine)
        start = time.perf_counter()
        for out in outputs:
            self._deliver(out)
        self.step_loop_times.update += time.perf_counter() - start
        if pipeline.fatal is not None:
            raise pipeline.fatal

    async def _in_worker(self, loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the worker thread; counts as loop_delay how long the event loop took to
        come back to this coroutine after the worker had finished."""

        def timed() -> Any:
            try:
                return fn(*args)
            finally:
                self._worker_done = time.perf_counter()

        try:
            return await loop.run_in_executor(self._executor, timed)
        finally:
            self.step_loop_times.loop_delay += max(time.perf_counter() - self._worker_done, 0.0)

    async def _serve_until_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Step while there is work, then mark the engine idle and return (the caller parks). Holds
        the engine strongly for the whole busy spell, so the per-step path resolves nothing."""
        engine = self.engine
        pipeline = engine.pipeline
        assert self._work_available is not None and self._idle is not None
        try:
            while True:
                if not engine.has_unfinished_requests() and not pipeline.in_flight:
                    self._idle.set()
                    self._work_available.clear()
                    return
                scheduler_output = engine.schedule()
                work = pipeline.prepare(scheduler_output)
                if work is None:
                    # Only aborted/finished bookkeeping this step; let other tasks run, then go on.
                    engine.update(scheduler_output, None)
                    await asyncio.sleep(0)
                    continue
                # Async scheduling: launch step N+1 and wait for step N's ids in one worker-thread
                # call, then apply step N on the loop while the device runs N+1.
                await self._trip(loop, work)
                if pipeline.in_flight and not engine.has_unfinished_requests():
                    # Nobody waits for the step just launched: drain it so an idle engine is idle.
                    work = pipeline.prepare(None)
                    assert work is not None
                    await self._trip(loop, work)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            logger.exception("the engine step loop died")
            self.dead_error = exc
            dead = EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}")
            for out in engine.abort_all():
                out.error = str(dead)
                for c in out.outputs:
                    c.finish_reason = "error"
                self._deliver(out)
            raise


async def _step_loop(
    engine_ref: weakref.ref[AsyncEngine], work_available: asyncio.Event, times: StepLoopTimes
) -> None:
    """The engine's step-loop task. A function, not a method, so that while parked on
    `work_available` it holds only a weak reference to the engine (and the event and the times, which
    own nothing): a task referring to the engine would be a cycle (engine -> task -> engine) that only
    the garbage collector frees. Resolved once per busy spell, not per step."""
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    while True:
        engine = engine_ref()
        if engine is None:
            return  # dropped without shutdown(); _wake woke us to end
        await engine._serve_until_idle(loop)
        del engine  # if this was the last reference, the engine is freed here and _wake is queued
        start = clock()
        await work_available.wait()
        times.idle += clock() - start


def _wake(loop: asyncio.AbstractEventLoop, work_available: asyncio.Event) -> None:
    """Finalizer of a started engine: wake its parked step loop (from whatever thread dropped it)."""
    try:
        loop.call_soon_threadsafe(work_available.set)
    except RuntimeError:  # the loop is closed; asyncio.run cancelled the task with it
        pass
