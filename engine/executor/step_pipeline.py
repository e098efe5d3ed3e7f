"""The step pipeline: the one owner of "launch step N+1, collect step N" and of the step in flight.

With async scheduling (the default) one trip to the device launches the step just scheduled and
then waits for the results of the step launched before it, so the host's bookkeeping for step N
(update, detokenize, stream) runs while the device computes step N+1. Without it, a trip runs one
step to the end. Either way a step is three parts:

    prepare(scheduler_output)   the host: take the step in flight           -> StepWork
    run_device(work)            the device half: launch, wait               (the async engine runs
                                                                              this on "weir-gpu")
    complete(work, sink)        the host: apply results or report failures  -> the outputs

`step()` runs the three in a row (the offline engine); the async engine runs the middle one on its
worker thread and the others on the event loop, and that is all it decides. The sink (the engine's
update and fail_scheduled) is passed per call, not held: the engine holds the pipeline, and a
reference back would be a cycle that keeps the model and KV cache alive until a garbage collection. A step that raises
fails only its own requests (`fail_scheduled`); an error that leaves the device unusable (a CUDA
error) is remembered in `fatal`, for the async engine to stop on.

Times go into StepLoopTimes (engine/executor/step_loop_times.py): launch, device_wait and steps
here; schedule and update in the engine's own primitives.

Hot path: per step a handful of calls and one small object, nothing per request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, TypeVar

from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.executor.executor import Executor, LaunchedStep
from engine.executor.step_loop_times import StepLoopTimes

Out = TypeVar("Out")
Out_co = TypeVar("Out_co", covariant=True)

# Errors after which the device state cannot be trusted: the server stops and /health turns 503.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "illegal memory access", "device-side assert")


def is_fatal(exc: BaseException) -> bool:
    """True for an error that leaves the device unusable (every later step would fail too), or that
    says so itself (`fatal = True`: a tensor-parallel worker died or hung)."""
    return getattr(exc, "fatal", False) is True or any(marker in str(exc) for marker in _FATAL_MARKERS)


class StepSink(Protocol[Out_co]):
    """Where a step's results go (the engine). Its methods are looked up at call time, so a wrapper
    set on the engine (a profiler, a fault injection) sees every call."""

    def update(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput | None
    ) -> list[Out_co]: ...

    def fail_scheduled(self, scheduler_output: SchedulerOutput, exc: BaseException) -> list[Out_co]: ...


@dataclass(slots=True, eq=False)
class StepWork:
    """One trip to the device: launch `scheduler_output` (if any), then collect `previous` (if any).
    Sync mode: `output` is `scheduler_output`'s own result. An error is stored, not raised."""

    scheduler_output: SchedulerOutput | None
    previous: tuple[SchedulerOutput, LaunchedStep] | None
    launched: LaunchedStep | BaseException | None = None
    output: ModelRunnerOutput | BaseException | None = None


class StepPipeline:
    def __init__(self, executor: Executor, times: StepLoopTimes, async_scheduling: bool) -> None:
        self.executor = executor
        self.times = times
        self.async_scheduling = async_scheduling
        # The step on the device whose results the next trip collects (async scheduling only).
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        # The first error that left the device unusable, if any.
        self.fatal: BaseException | None = None
        # Trips that only collected the step in flight (async scheduling) because the schedule came
        # back empty: everything left to run needed that step's results on the host first (a beam
        # group ranks its candidates before its next step), so the device idled from that step's end
        # to the next launch. A flush (draining on purpose) does not count.
        self.num_stalls = 0

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    # ------------------------------------------------------------------ the three parts
    def prepare(self, scheduler_output: SchedulerOutput | None) -> StepWork | None:
        """Host side: the trip that launches `scheduler_output` (None: only collect the step in
        flight), or None when the device has nothing to do."""
        has_work = scheduler_output is not None and not scheduler_output.is_empty
        previous = self._in_flight
        if not has_work and previous is None:
            return None
        if not has_work and scheduler_output is not None:
            self.num_stalls += 1
        self._in_flight = None
        return StepWork(scheduler_output if has_work else None, previous)

    def run_device(self, work: StepWork) -> None:
        """Device half: launch, then wait for the previous step's results. Any thread; raises nothing."""
        so = work.scheduler_output
        if not self.async_scheduling:
            if so is not None:
                try:
                    work.output = self.execute(so)
                except Exception as exc:  # noqa: BLE001 - reported on the step's requests
                    work.output = exc
            return
        previous = work.previous
        if so is not None:
            try:
                work.launched = self.launch(so, previous[1] if previous is not None else None)
            except Exception as exc:  # noqa: BLE001 - reported on the step's requests
                work.launched = exc
        if previous is not None:
            try:
                work.output = self.wait(previous[1])
            except Exception as exc:  # noqa: BLE001 - reported on the step's requests
                work.output = exc

    def complete(self, work: StepWork, sink: StepSink[Out]) -> list[Out]:
        """Host side: keep the launched step in flight, apply the collected results (or fail the
        requests of a step that raised); the outputs of the requests that changed."""
        outputs: list[Out] = []
        so, launched = work.scheduler_output, work.launched
        if not self.async_scheduling:
            if so is not None:
                outputs = self._finish(so, work.output, sink)
            return outputs
        if isinstance(launched, BaseException):
            assert so is not None
            outputs += self._report(so, launched, sink)
        elif launched is not None:
            assert so is not None
            self._in_flight = (so, launched)
        if work.previous is not None:
            outputs += self._finish(work.previous[0], work.output, sink)
        return outputs

    def _finish(
        self, so: SchedulerOutput, output: ModelRunnerOutput | BaseException | None, sink: StepSink[Out]
    ) -> list[Out]:
        if isinstance(output, BaseException):
            return self._report(so, output, sink)
        return sink.update(so, output)

    def _report(self, so: SchedulerOutput, exc: BaseException, sink: StepSink[Out]) -> list[Out]:
        if self.fatal is None and is_fatal(exc):
            self.fatal = exc
        return sink.fail_scheduled(so, exc)

    # ------------------------------------------------------------------ drivers
    def step(self, scheduler_output: SchedulerOutput, sink: StepSink[Out]) -> list[Out]:
        """One trip, here and now. Async: the outputs are those of the step launched before."""
        work = self.prepare(scheduler_output)
        if work is None:
            return sink.update(scheduler_output, None)  # only finished/aborted bookkeeping
        self.run_device(work)
        return self.complete(work, sink)

    def flush(self, sink: StepSink[Out]) -> list[Out]:
        """Collect and apply the step in flight, if any: afterwards the device holds no step."""
        work = self.prepare(None)
        if work is None:
            return []
        self.run_device(work)
        return self.complete(work, sink)

    def discard(self) -> None:
        """Forget the step in flight without waiting for it (shutdown: its results are unwanted)."""
        self._in_flight = None

    # ------------------------------------------------------------------ timed executor calls
    def launch(self, scheduler_output: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep:
        times = self.times
        times.steps += 1
        start = time.perf_counter()
        try:
            return self.executor.launch(scheduler_output, previous)
        finally:
            times.launch += time.perf_counter() - start

    def wait(self, launched: LaunchedStep) -> ModelRunnerOutput:
        start = time.perf_counter()
        try:
            return self.executor.collect(launched)
        finally:
            self.times.device_wait += time.perf_counter() - start

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One step to the end; its time counts as device wait (the host waits for all of it)."""
        times = self.times
        times.steps += 1
        start = time.perf_counter()
        try:
            return self.executor.execute(scheduler_output)
        finally:
            times.device_wait += time.perf_counter() - start
