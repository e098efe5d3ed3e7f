"""Async scheduling (step N+1 launched before step N's ids reach the host) changes nothing a user
sees: the same tokens, text, logprobs and finish reasons as one-step-at-a-time, for greedy and seeded
sampling, penalties, stops found a step late, preemption and aborts — and no KV block is leaked.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.worker.step_in_flight import scatter_rows
from tests.e2e.test_parity import _greedy, _prompts, hf_greedy


def _llm(model_dir: Path, async_scheduling: bool, **kwargs) -> LLM:
    return LLM(str(model_dir), device="cpu", dtype="float32", async_scheduling=async_scheduling, **kwargs)


def _summary(outs) -> list[list[tuple]]:
    """What a user reads from each output: per completion its ids, text, finish reason and the
    logprob entries' token ids and ranks (values are compared separately, with a tolerance: when
    preemption hits at another step, recomputed positions differ in the last float bits)."""
    result = []
    for o in outs:
        rows = []
        for c in o.outputs:
            ranks = (
                None
                if c.logprobs is None
                else [sorted((t, lp.rank) for t, lp in pos.items()) for pos in c.logprobs]
            )
            rows.append((c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason, ranks))
        result.append(rows)
    return result


def _logprob_values(outs) -> list[float]:
    return [
        lp.logprob
        for o in outs
        for c in o.outputs
        for pos in (c.logprobs or [])
        for _, lp in sorted(pos.items())
    ]


def _mixed_params(stop_ids: list[int]) -> list[SamplingParams]:
    """One row of every kind the sampler distinguishes, each with its own stop condition."""
    return [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=15, ignore_eos=True, logprobs=2),
        SamplingParams(
            temperature=0.7, top_k=20, seed=3, max_tokens=10, repetition_penalty=1.3, ignore_eos=True
        ),
        SamplingParams(
            temperature=0.0, max_tokens=14, frequency_penalty=0.5, presence_penalty=0.3, ignore_eos=True
        ),
        SamplingParams(temperature=0.0, max_tokens=18, stop_token_ids=stop_ids, min_tokens=2),
        SamplingParams(temperature=0.8, seed=11, n=2, max_tokens=9, min_tokens=4, ignore_eos=True),
    ]


def _assert_idle(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache_usage == 0.0
    assert not engine.pipeline.in_flight


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_parity_without_async_scheduling(tiny_model_dirs: dict[str, Path], family: str) -> None:
    """The synchronous path stays exact too (async is the default everywhere else in the suite)."""
    model_dir = tiny_model_dirs[family]
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    llm = _llm(
        model_dir, False, max_num_batched_tokens=7, block_size=8, num_kv_blocks=9, admission_reserve_tokens=0
    )
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.llm_engine.stats().num_preemptions > 0
    _assert_idle(llm)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_batched_tokens": 7},  # chunked prefill mixed with decodes
        {
            "block_size": 8,
            "num_kv_blocks": 12,
            "admission_reserve_tokens": 0,
        },  # preemption while a step is in flight
    ],
    ids=["default", "chunked", "preemption"],
)
def test_async_matches_sync_for_every_sampling_kind(tiny_model_dirs: dict[str, Path], engine_kwargs) -> None:
    model_dir = tiny_model_dirs["llama"]
    prompts = _prompts(seed=4) + _prompts(seed=5)[:2]
    # A stop token the greedy row 4 really produces mid-way, so it stops while the next step runs.
    greedy_ref, _ = hf_greedy(model_dir, [prompts[4]], max_tokens=18, seed=99)
    stop_ids = [greedy_ref[0][6]]
    params = _mixed_params(stop_ids)
    sync_llm = _llm(model_dir, False, **engine_kwargs)
    async_llm = _llm(model_dir, True, **engine_kwargs)
    sync_outs = sync_llm.generate(prompts, params, use_tqdm=False)
    async_outs = async_llm.generate(prompts, params, use_tqdm=False)
    expected = _summary(sync_outs)
    assert _summary(async_outs) == expected
    assert _logprob_values(async_outs) == pytest.approx(_logprob_values(sync_outs), abs=1e-4)
    assert len(_logprob_values(sync_outs)) >= 15 * 3
    assert expected[4][0][3] == "stop" and len(expected[4][0][1]) <= 7  # the stop really fired early
    if "num_kv_blocks" in engine_kwargs:
        assert async_llm.llm_engine.stats().num_preemptions > 0
    _assert_idle(async_llm)
    _assert_idle(sync_llm)


def test_stop_string_found_a_step_late_is_exact(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["qwen2"]
    prompts = _prompts(seed=8)
    sync_llm = _llm(model_dir, False)
    free_run = sync_llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False
    )
    # Stop on a piece of text each completion really contains, so every request stops early.
    stops = [o.outputs[0].text[4:7] for o in free_run if len(o.outputs[0].text) >= 8]
    assert stops
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=stops)
    expected = _summary(sync_llm.generate(prompts, params, use_tqdm=False))
    async_llm = _llm(model_dir, True)
    got = _summary(async_llm.generate(prompts, params, use_tqdm=False))
    assert got == expected
    assert any(rows[0][3] == "stop" for rows in expected)
    _assert_idle(async_llm)


def test_abort_with_a_step_in_flight_frees_blocks(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["llama"]
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", block_size=8))
    assert engine.config.scheduler.async_scheduling
    prompts = _prompts()
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(prompts[:2]):
        engine.add_request(f"r{i}", p, greedy)
    engine.step()
    engine.step()
    assert engine.pipeline.in_flight  # a step is on the device (here: done, not yet applied)
    used_with_both = engine.scheduler.kv_cache_usage
    engine.abort_request("r1")
    assert engine.scheduler.kv_cache_usage < used_with_both
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "r0"
            final = out
    assert final is not None and final.finished
    expected, _ = hf_greedy(model_dir, prompts)
    assert final.outputs[0].token_ids == expected[0]
    assert engine.scheduler.kv_cache_usage == 0.0
    assert not engine.pipeline.in_flight


def test_request_id_reused_while_old_step_in_flight(tiny_model_dirs: dict[str, Path]) -> None:
    """A finished id reused at once must not receive the old request's in-flight token."""
    model_dir = tiny_model_dirs["llama"]
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32"))
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    engine.add_request("x", prompts[0], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    engine.add_request("keep", prompts[1], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("x")  # its next token is still in flight
    engine.add_request("x", prompts[2], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
    assert finals == {"x": expected[2], "keep": expected[1]}
    assert engine.scheduler.kv_cache_usage == 0.0


def test_scatter_rows_in_order_and_permuted() -> None:
    sampled = torch.tensor([101, 102, 103, 104])
    ids = torch.zeros(6, dtype=torch.int64)
    scatter_rows(ids, [0, 1, 2], sampled, [0, 1, 2])  # steady decoding: one slice copy
    assert ids.tolist() == [101, 102, 103, 0, 0, 0]
    ids.zero_()
    scatter_rows(ids, [1, 4, 5], sampled, [3, 0, 2])  # a finished row shifted the batch
    assert ids.tolist() == [0, 104, 0, 0, 101, 103]


def test_random_batch_async_equals_sync(tiny_model_dirs: dict[str, Path]) -> None:
    """Requests of random lengths and limits, arriving while others run, under a tight cache."""
    model_dir = tiny_model_dirs["mistral"]
    rng = random.Random(21)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(2, 30))] for _ in range(10)]
    params = [
        SamplingParams(
            temperature=rng.choice([0.0, 0.8]),
            seed=rng.randrange(100),
            max_tokens=rng.randrange(1, 14),
            ignore_eos=rng.random() < 0.5,
        )
        for _ in prompts
    ]
    results = []
    for use_async in (False, True):
        engine = LLMEngine(
            EngineConfig(
                model=str(model_dir),
                device="cpu",
                dtype="float32",
                block_size=8,
                num_kv_blocks=14,
                max_num_batched_tokens=16,
                async_scheduling=use_async,
            )
        )
        finals: dict[str, list[int]] = {}
        pending = list(range(len(prompts)))
        steps = 0
        while pending or engine.has_unfinished_requests():
            if pending and steps % 2 == 0:  # staggered arrivals
                i = pending.pop(0)
                engine.add_request(str(i), prompts[i], params[i])
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out.outputs[0].token_ids
            steps += 1
        assert engine.scheduler.kv_cache_usage == 0.0
        results.append(finals)
    assert results[1] == results[0]
    assert len(results[0]) == len(prompts)


def test_steps_resolve_in_launch_order_whoever_asks_first(tiny_model_dirs: dict[str, Path]) -> None:
    """Two steps launched back to back; asking the second for its result first still appends the
    first step's token first (each step resolves its predecessor)."""
    model_dir = tiny_model_dirs["qwen2"]
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32"))
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    engine.add_request("a", prompts[1], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    executor = engine.executor
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        so_1 = engine.schedule()
        step_1 = executor.launch(so_1, None)
        so_2 = engine.schedule()  # the decode of the token step_1 is still sampling
        step_2 = executor.launch(so_2, step_1) if not so_2.is_empty else None
        outputs_2 = executor.collect(step_2) if step_2 is not None else None
        for so, runner_output in ((so_1, executor.collect(step_1)), (so_2, outputs_2)):
            for out in engine.update(so, runner_output):
                tokens += out.outputs[0].token_ids_delta
    assert tokens == expected[1]
    # The runner's copy got the ids in launch order too (it drops "a" on the next step, which carries
    # the finished id).
    assert {k: s.token_ids for k, s in executor.runner.requests.items()} == {"a": [*prompts[1], *expected[1]]}
    assert engine.scheduler.kv_cache_usage == 0.0
