"""best_of: best_of samples run, the n with the highest cumulative logprob come back (vLLM v0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=128)


def _usage(llm: LLM) -> float:
    return llm.llm_engine.scheduler.kv_cache_usage


def test_best_of_returns_the_n_highest_cumulative_logprobs(llm: LLM) -> None:
    """best_of=4, n=2 runs the same 4 children n=4 does (same seed: child i gets seed + i, and seeded
    sampling does not depend on the batch) and keeps the 2 best, best first, re-indexed."""
    sample = {"temperature": 1.0, "seed": 11, "max_tokens": 8, "ignore_eos": True}
    (all4,) = llm.generate([PROMPT], SamplingParams(n=4, logprobs=0, **sample), use_tqdm=False)
    candidates = all4.outputs
    assert len({tuple(c.token_ids) for c in candidates}) == 4  # four distinct samples to rank
    best = sorted(candidates, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.index for c in best] != [0, 1]  # the ranking, not the first two, decides

    (out,) = llm.generate([PROMPT], SamplingParams(n=2, best_of=4, **sample), use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in best]
    assert [c.text for c in out.outputs] == [c.text for c in best]
    # Computed though logprobs were not asked for; the per-token logprobs stay absent.
    assert [c.cumulative_logprob for c in out.outputs] == pytest.approx(
        [c.cumulative_logprob for c in best], abs=1e-5
    )
    assert all(c.logprobs is None for c in out.outputs)
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob
    assert _usage(llm) == 0.0


def test_best_of_with_logprobs_keeps_them(llm: LLM) -> None:
    sample = {"temperature": 1.0, "seed": 3, "max_tokens": 5, "ignore_eos": True, "logprobs": 2}
    (all3,) = llm.generate([PROMPT], SamplingParams(n=3, **sample), use_tqdm=False)
    top = max(all3.outputs, key=lambda c: c.cumulative_logprob)
    (out,) = llm.generate([PROMPT], SamplingParams(n=1, best_of=3, **sample), use_tqdm=False)
    (only,) = out.outputs
    assert only.index == 0
    assert only.token_ids == top.token_ids
    assert only.logprobs == top.logprobs


def test_best_of_streams_nothing_until_finished(llm: LLM) -> None:
    """Which samples come back is known only at the end: even a delta request gets one output."""
    engine = llm.llm_engine
    params = SamplingParams(n=1, best_of=2, seed=5, max_tokens=4, ignore_eos=True, output_kind="delta")
    engine.add_request("d", PROMPT, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    outputs += engine.flush()
    assert len(outputs) == 1 and outputs[0].finished
    assert len(outputs[0].outputs) == 1 and len(outputs[0].outputs[0].token_ids) == 4


def test_abort_frees_every_best_of_child(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("bo", [5] * 40, SamplingParams(n=1, best_of=4, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.scheduler.num_running + engine.scheduler.num_waiting == 4
    assert _usage(llm) > 0.0
    engine.abort_request("bo")
    assert not engine.has_unfinished_requests()
    engine.step()
    assert not engine.scheduler.has_unfinished_requests()
    assert _usage(llm) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 3, "best_of": 2}, "best_of must be in [3, 128]; got 2"),
        ({"n": 1, "best_of": 129}, "best_of must be in [1, 128]; got 129"),
        (
            {"n": 1, "best_of": 2, "temperature": 0.0},
            "best_of must equal n (1) when using greedy sampling (temperature 0): every sample would be "
            "the same sequence; got best_of 2",
        ),
    ],
)
def test_bad_best_of_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        SamplingParams(**kwargs)
    assert str(exc.value) == message
    assert exc.value.param == "best_of"  # type: ignore[attr-defined]


def test_greedy_best_of_equal_to_n_is_allowed() -> None:
    assert SamplingParams(n=2, best_of=2, temperature=0.0).num_sequences == 2


def test_best_of_above_the_server_limit_is_refused(llm: LLM) -> None:
    limit = llm.llm_engine.config.scheduler.max_best_of
    assert limit == EngineConfig(model="x").max_best_of == 20
    with pytest.raises(ValueError) as exc:
        llm.generate([PROMPT], SamplingParams(n=1, best_of=limit + 1), use_tqdm=False)
    assert str(exc.value) == (
        "best_of must be at most 20 (the server's max_best_of) when it is greater than n; got 21"
    )
    assert not llm.llm_engine.has_unfinished_requests()
    # n itself is not bounded by max_best_of: best_of == n asks for nothing thrown away.
    (out,) = llm.generate([PROMPT], SamplingParams(n=21, best_of=21, max_tokens=1), use_tqdm=False)
    assert len(out.outputs) == 21


def test_max_best_of_is_configurable() -> None:
    from app.config import resolve
    from engine.inputs.input_processor import InputProcessor

    engine_config, _ = resolve({"model": "x", "max_best_of": 3}, env={})
    assert engine_config.max_best_of == 3
    processor = InputProcessor(None, 1000, 128, 16, 100, eos_token_ids=[2], max_best_of=3)
    processor.process("ok", [5, 6], SamplingParams(n=1, best_of=3))
    with pytest.raises(ValueError, match=r"^best_of must be at most 3 \(the server's max_best_of\)"):
        processor.process("no", [5, 6], SamplingParams(n=1, best_of=4))
