"""The executor contract and the step pipeline: what crosses to the workers is plain data, steps are
launched ahead and collected in launch order, and a failing step fails only its own requests."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from engine import SamplingParams
from engine.config import EngineConfig
from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.executor.executor import Executor
from engine.executor.step_loop_times import StepLoopTimes
from engine.executor.step_pipeline import StepPipeline
from engine.llm_engine import LLMEngine


def _engine(model_dir: Path, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", **kwargs))


def test_scheduler_and_runner_outputs_pickle_round_trip(tiny_model_dirs: dict[str, Path]) -> None:
    """Every SchedulerOutput and ModelRunnerOutput of a run (new and running requests, logprobs,
    prompt logprobs, finished ids) survives pickling unchanged and holds no scheduler Request."""
    engine = _engine(tiny_model_dirs["llama"], max_num_batched_tokens=16)
    executor = engine.executor
    real_launch, real_collect = executor.launch, executor.collect
    sent: list[SchedulerOutput] = []
    received: list[ModelRunnerOutput] = []

    def launch(so, previous):
        sent.append(pickle.loads(pickle.dumps(so)))  # what a worker process would see
        assert sent[-1] == so
        return real_launch(so, previous)

    def collect(launched):
        out = real_collect(launched)
        received.append(out)
        return out

    executor.launch, executor.collect = launch, collect
    engine.add_request("a", list(range(3, 23)), SamplingParams(max_tokens=4, logprobs=2, prompt_logprobs=1))
    engine.add_request("b", [7, 8, 9], SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()

    assert any(so.new_requests for so in sent) and any(so.cached_requests for so in sent)
    assert any(so.finished_req_ids for so in sent)
    assert any(out.logprobs for out in received) and any(out.prompt_logprobs for out in received)
    for so in sent:
        assert b"engine.core.request" not in pickle.dumps(so)
    for out in received:
        data = pickle.dumps(out)
        assert pickle.loads(data) == out
        assert b"torch" not in data
    assert engine.scheduler.kv_cache_usage == 0.0


def test_failed_launch_fails_its_requests_and_leaves_no_step_behind(tiny_model_dirs: dict[str, Path]) -> None:
    engine = _engine(tiny_model_dirs["qwen3"])
    executor = engine.executor
    real_launch = executor.launch
    launched: list[SchedulerOutput] = []

    def flaky(so, previous):
        launched.append(so)
        if len(launched) == 3:
            raise RuntimeError("injected launch failure")
        return real_launch(so, previous)

    executor.launch = flaky
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("doomed", [5, 6, 7], params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    doomed = finals["doomed"]
    assert doomed.outputs[0].finish_reason == "error"
    assert doomed.error == "the forward pass failed: RuntimeError: injected launch failure"
    assert len(doomed.outputs[0].token_ids) == 1  # the first step's token; the second was in flight
    assert engine.pipeline.fatal is None  # not a device error: the engine goes on
    engine.add_request("next", [8, 9], params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            finals[out.request_id] = out
    assert finals["next"].finished and len(finals["next"].outputs[0].token_ids) == 8
    assert engine.scheduler.kv_cache_usage == 0.0
    assert all(engine.scheduler.scheduled_requests(so) == {} for so in launched)


class _FakeExecutor(Executor):
    """Samples token 100 + step number for every scheduled request; logs the calls in order."""

    def __init__(self, fail_collect_of: int | None = None, message: str = "boom") -> None:
        self.calls: list[str] = []
        self.fail_collect_of = fail_collect_of
        self.message = message

    def determine_num_kv_blocks(self) -> int:
        return 8

    def initialize_kv_cache(self, num_blocks: int) -> None:
        pass

    def launch(self, so: SchedulerOutput, previous):
        self.calls.append(f"launch {so.step_id} after {previous[0].step_id if previous else None}")
        return (so, ModelRunnerOutput({r: [100 + so.step_id] for r in so.num_scheduled_tokens}))

    def collect(self, launched):
        so, out = launched
        self.calls.append(f"collect {so.step_id}")
        if so.step_id == self.fail_collect_of:
            raise RuntimeError(self.message)
        return out

    def shutdown(self) -> None:
        pass


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def update(self, so, runner_output):
        self.events.append(("update", so.step_id, runner_output and runner_output.sampled_token_ids))
        return [so.step_id]

    def fail_scheduled(self, so, exc):
        self.events.append(("fail", so.step_id, str(exc)))
        return [-so.step_id]


def _so(step_id: int, req_ids: tuple[str, ...] = ("r",)) -> SchedulerOutput:
    return SchedulerOutput([], [], dict.fromkeys(req_ids, 1), len(req_ids), set(), step_id=step_id)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_pipeline_launches_ahead_and_applies_in_order(async_scheduling: bool) -> None:
    executor, sink, times = _FakeExecutor(), _Sink(), StepLoopTimes()
    pipeline = StepPipeline(executor, times, async_scheduling)
    outputs = [pipeline.step(_so(i), sink) for i in (1, 2, 3)] + [pipeline.flush(sink)]
    if async_scheduling:
        assert executor.calls == [
            "launch 1 after None",
            "launch 2 after 1",
            "collect 1",
            "launch 3 after 2",
            "collect 2",
            "collect 3",
        ]
        assert outputs == [[], [1], [2], [3]]
    else:
        assert executor.calls == [
            "launch 1 after None",
            "collect 1",
            "launch 2 after None",
            "collect 2",
            "launch 3 after None",
            "collect 3",
        ]
        assert outputs == [[1], [2], [3], []]
    assert [e[:2] for e in sink.events] == [("update", 1), ("update", 2), ("update", 3)]
    assert sink.events[0][2] == {"r": [101]}
    assert not pipeline.in_flight and times.steps == 3
    # An empty step with nothing in flight never reaches the device.
    assert pipeline.step(_so(4, ()), sink) == [4] and len(executor.calls) == 6


def test_pipeline_reports_a_failed_collect_on_that_step_and_flags_device_errors() -> None:
    executor, sink = _FakeExecutor(fail_collect_of=1), _Sink()
    pipeline = StepPipeline(executor, StepLoopTimes(), async_scheduling=True)
    assert pipeline.step(_so(1), sink) == []
    assert pipeline.step(_so(2), sink) == [-1]  # step 1's requests fail; step 2 stays in flight
    assert sink.events == [("fail", 1, "boom")] and pipeline.in_flight and pipeline.fatal is None
    executor.fail_collect_of, executor.message = 2, "CUDA error: an illegal memory access was encountered"
    assert pipeline.flush(sink) == [-2]
    assert str(pipeline.fatal) == executor.message
