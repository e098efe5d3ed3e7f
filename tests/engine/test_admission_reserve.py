"""Admission's reserve (EngineConfig.admission_reserve_tokens): a waiting request is admitted only if
the free KV blocks left after it still cover the running requests' rest of prompt and next N tokens
(fewer where max_tokens ends them), so running requests grow without preempting each other. With 0,
the policy is vLLM's: admit whenever the next prompt chunk fits, preempt (and recompute) to grow.
Outputs never depend on it; preemptions and how many requests run at once do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.core.block_pool import NULL_BLOCK
from engine.core.kv_cache_manager import KVCacheManager
from tests.e2e.test_parity import _prompts, hf_greedy
from tests.engine.test_scheduler import (
    FakeRunner,
    assert_all_blocks_free,
    expected_outputs,
    make_req,
    make_sched,
    run_to_completion,
    step,
)

PROMPTS = [list(range(20 + 16 * i, 36 + 16 * i)) for i in range(6)]  # 16 tokens: 2 blocks of 8


@pytest.mark.parametrize(
    ("reserve", "admitted"),
    [
        (0, 5),  # vLLM's policy: every prompt that fits, 2 blocks each, 10 blocks
        (8, 3),  # 16 + 8 tokens: 3 blocks each
        (16, 2),  # 16 + 16 (all of max_tokens): 4 blocks each
        (1000, 2),  # never more than max_tokens: as 16
    ],
)
def test_admission_leaves_the_running_requests_room_to_grow(reserve: int, admitted: int) -> None:
    sched = make_sched(num_kv_blocks=10, budget=128, admission_reserve_tokens=reserve)
    runner = FakeRunner(10)
    reqs = [make_req(f"r{i}", p, max_tokens=16, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    for r in reqs:
        sched.add_request(r)
    so, _ = step(sched, runner)
    assert [r.req_id for r in so.new_requests] == [f"r{i}" for i in range(admitted)]
    run_to_completion(sched, runner)
    # The same tokens either way; with a reserve covering max_tokens nobody is preempted, without one
    # the five running requests run out of blocks as they grow.
    assert [r.output_token_ids for r in reqs] == [expected_outputs(p, 16) for p in PROMPTS]
    if reserve >= 16:
        assert sched.num_preemptions == 0
    if reserve == 0:
        assert sched.num_preemptions > 0
    assert_all_blocks_free(sched)


def test_a_request_alone_is_admitted_whatever_the_reserve() -> None:
    """The input processor admits only requests that fit the cache alone: one that fits, but not with
    the reserve on top, still runs when nothing else does (no request waits forever)."""
    sched, runner = make_sched(num_kv_blocks=4, budget=64, admission_reserve_tokens=10_000), FakeRunner(4)
    a = make_req("a", list(range(30, 54)), max_tokens=8, ignore_eos=True)  # 24 + 8 tokens: all 4 blocks
    b = make_req("b", list(range(60, 70)), max_tokens=4, ignore_eos=True)
    sched.add_request(a)
    sched.add_request(b)
    so, _ = step(sched, runner)
    assert [r.req_id for r in so.new_requests] == ["a"]  # b waits for a's blocks, not a preemption
    run_to_completion(sched, runner)
    assert a.output_token_ids == expected_outputs(a.prompt_token_ids, 8)
    assert b.output_token_ids == expected_outputs(b.prompt_token_ids, 4)
    assert sched.num_preemptions == 0
    assert_all_blocks_free(sched)


def test_chunked_prompts_count_their_unscheduled_chunks() -> None:
    """A prompt admitted by its first chunk still needs blocks for the rest: the reserve counts them, so
    the requests behind it wait instead of taking the blocks its next chunks need."""
    sched = make_sched(
        num_kv_blocks=10, budget=128, long_prefill_token_threshold=8, admission_reserve_tokens=8
    )
    runner = FakeRunner(10)
    long = make_req("long", list(range(100, 148)), max_tokens=8, ignore_eos=True)  # 48 + 8: 7 blocks
    short = [make_req(f"s{i}", PROMPTS[i], max_tokens=8, ignore_eos=True) for i in range(3)]  # 3 each
    for r in [long, *short]:
        sched.add_request(r)
    so, _ = step(sched, runner)
    # long took 1 block for its first chunk and holds 6 more in reserve; s0 needs 3: 9 free >= 6 + 3
    assert [r.req_id for r in so.new_requests] == ["long", "s0"]
    run_to_completion(sched, runner)
    assert sched.num_preemptions == 0
    assert long.output_token_ids == expected_outputs(long.prompt_token_ids, 8)
    assert_all_blocks_free(sched)


def test_blocks_to_hold_counts_free_hits_and_stops_at_the_window() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=8, enable_prefix_caching=True)
    assert kv.blocks_to_hold("new", 20) == 3
    free_hit, held_hit = kv.block_pool.blocks[1], kv.block_pool.blocks[2]
    held_hit.ref_cnt = 1  # another sequence holds it: joining costs the pool nothing
    # two hits hold 16 of 20 tokens: one new block, and the free hit leaves the pool too
    assert kv.blocks_to_hold("new", 20, [free_hit, held_hit]) == 2
    held_hit.ref_cnt = 0
    windowed = KVCacheManager(num_blocks=16, block_size=8, enable_prefix_caching=False, sliding_window=16)
    # a window of 16 tokens lives in at most cdiv(16, 8) + 1 = 3 blocks, however long the sequence
    assert windowed.blocks_to_hold("new", 200) == 3
    assert windowed.blocks_to_hold("new", 200, [NULL_BLOCK] * 5) == 3  # released ones are not live


def test_default_reserve_runs_a_tight_cache_without_preemption(tiny_model_dirs: dict[str, Path]) -> None:
    """The engine's default (128 tokens): on a cache where vLLM's policy preempts (the parity tests'
    preemption mode), the same greedy tokens as transformers with no preemption."""
    model_dir = tiny_model_dirs["llama"]
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for reserve, preempts in ((None, False), (0, True)):
        kwargs = {} if reserve is None else {"admission_reserve_tokens": reserve}
        llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=8, num_kv_blocks=9, **kwargs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert (llm.llm_engine.stats().num_preemptions > 0) is preempts
        assert llm.llm_engine.scheduler.kv_cache_usage == 0.0
        llm.shutdown()
