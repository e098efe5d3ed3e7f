"""The tensor-parallel per-step messages (engine/executor/step_codec.py): every SchedulerOutput and
ModelRunnerOutput of a real run comes out of msgpack equal to what went in, as the worker's own
dataclasses, with the input processor's stop ids (EOS) intact; the step path never pickles, control
calls do."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from engine import LoRARequest, SamplingParams
from engine.config import EngineConfig
from engine.core.scheduler_output import (
    BeamCandidates,
    CachedRequestData,
    ForkedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from engine.executor import step_codec
from engine.llm_engine import LLMEngine


def _round_trip(so: SchedulerOutput) -> SchedulerOutput:
    method, (step_id, decoded, previous) = step_codec.decode_call(step_codec.encode_launch(7, so, 6))
    assert (method, step_id, previous) == ("launch", 7, 6)
    return decoded


def test_every_step_of_a_run_round_trips(tiny_model_dirs: dict[str, Path]) -> None:
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_model_dirs["llama"]), device="cpu", dtype="float32", max_num_batched_tokens=16
        )
    )
    executor = engine.executor
    real_launch, real_collect = executor.launch, executor.collect
    sent: list[SchedulerOutput] = []
    received: list[ModelRunnerOutput] = []

    def launch(so, previous):
        sent.append(so)
        decoded = _round_trip(so)  # what a worker process sees
        assert decoded == so
        return real_launch(decoded, previous)

    def collect(launched):
        out = real_collect(launched)
        assert step_codec.decode_reply(step_codec.encode_step_reply(out)) == ("ok", out)
        received.append(out)
        return out

    executor.launch, executor.collect = launch, collect
    engine.add_request("a", list(range(3, 23)), SamplingParams(max_tokens=4, logprobs=2, prompt_logprobs=1))
    engine.add_request(
        "b",
        [7, 8, 9],
        SamplingParams(temperature=0.8, seed=1, max_tokens=6, stop_token_ids=[11], logit_bias={5: -2.0}),
    )
    while engine.has_unfinished_requests():
        engine.step()

    assert any(so.new_requests for so in sent) and any(so.cached_requests for so in sent)
    assert any(so.finished_req_ids for so in sent)
    assert any(out.logprobs for out in received) and any(out.prompt_logprobs for out in received)
    # The EOS id the input processor added to stop_token_ids survives (SamplingParams' __post_init__
    # would reset it to [11]).
    params = next(r.sampling_params for so in sent for r in so.new_requests if r.req_id == "b")
    decoded = next(r.sampling_params for so in sent for r in _round_trip(so).new_requests if r.req_id == "b")
    assert params.all_stop_token_ids > {11}
    assert type(decoded) is SamplingParams and decoded.all_stop_token_ids == params.all_stop_token_ids
    assert engine.scheduler.kv_cache_usage == 0.0


def test_every_field_round_trips_without_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=5, stop=["\n\n"], min_tokens=2, logprobs=3)
    params.all_stop_token_ids = frozenset({2, 9})
    so = SchedulerOutput(
        new_requests=[
            NewRequestData(
                req_id="new-0",
                token_ids=[1, 70000, 3],
                num_prompt_tokens=2,
                sampling_params=params,
                block_ids=[4, 5],
                num_computed_tokens=1,
                is_beam=True,
                lora_request=LoRARequest("sql", 3, "/adapters/sql"),
            )
        ],
        cached_requests=[
            CachedRequestData("run-0", [8], 17, new_token_ids=[42, 43], cow=(1, 12)),
            CachedRequestData("run-1", [], 18),
        ],
        num_scheduled_tokens={"new-0": 2, "run-0": 1, "run-1": 1},
        total_num_scheduled_tokens=4,
        finished_req_ids={"gone-0", "gone-1"},
        preempted_req_ids={"gone-1"},
        step_id=99,
        num_prompt_tokens=2,
        block_copies=[(3, 12)],
        forked_requests=[ForkedRequestData("b#beam2", "b#beam0", 9, [44], [4, 6], 9)],
    )
    output = ModelRunnerOutput(
        sampled_token_ids={"new-0": [], "run-0": [7]},
        logprobs={"run-0": TokenLogprobs([7, 1], [-0.25, -1.5], 7, -0.25, 1)},
        prompt_logprobs={"new-0": [TokenLogprobs([3], [float("-inf")], 3, float("-inf"), 1)]},
        beam_candidates=BeamCandidates(
            ["b#beam0", "b#beam1"],
            2,
            np.array([[5, 9], [70000, 3]], dtype=np.int64).tobytes(),
            np.array([[-0.5, -1.25], [-0.75, float("-inf")]]).tobytes(),
        ),
    )

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the per-step path pickled")

    with monkeypatch.context() as patch:
        patch.setattr(pickle, "dumps", refuse)
        patch.setattr(pickle, "loads", refuse)
        decoded = _round_trip(so)
        assert step_codec.decode_call(step_codec.encode_collect(99)) == ("collect", (99,))
        assert step_codec.decode_reply(step_codec.encode_step_reply(output)) == ("ok", output)
        assert step_codec.decode_reply(step_codec.encode_step_reply(None)) == ("ok", None)
    assert decoded == so
    assert type(decoded.cached_requests[0]) is CachedRequestData and decoded.cached_requests[0].cow == (1, 12)
    assert type(decoded.forked_requests[0]) is ForkedRequestData
    assert decoded.new_requests[0].sampling_params.all_stop_token_ids == frozenset({2, 9})
    # Control calls and their replies stay pickled, on the same pipes.
    frame = step_codec.encode_control("add_lora", (LoRARequest("sql", 3, "/adapters/sql"),))
    assert frame[:1] == step_codec.PICKLE
    assert step_codec.decode_call(frame) == ("add_lora", (LoRARequest("sql", 3, "/adapters/sql"),))
    assert step_codec.decode_reply(step_codec.encode_reply(("error", "trace"))) == ("error", "trace")
    with pytest.raises(ValueError, match="unknown frame kind b'X'"):
        step_codec.decode_call(b"X123")
