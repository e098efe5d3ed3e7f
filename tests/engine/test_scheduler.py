"""Scheduler: admission, token-budget scheduling, chunked prefill, preemption, stops, aborts.

A fake runner plays the model: it keeps per-request state from the SchedulerOutput diffs, writes
each computed token id into a fake paged KV cache at (block table[pos // bs], pos % bs), reads the
whole context back through the block table before "sampling", and samples a token that depends on
that context. A wrong block table, a shared block overwritten, or a bad prefix hit changes the tokens.
"""

from __future__ import annotations

import random

import pytest

from engine.config import CacheConfig, SchedulerConfig
from engine.core.request import Request, RequestStatus
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput

BS = 8


def make_sched(
    num_kv_blocks: int = 64,
    max_model_len: int = 256,
    budget: int = 64,
    max_num_seqs: int = 16,
    prefix_caching: bool = True,
    long_prefill_token_threshold: int = 0,
    mixed_step_token_cap: int = 0,
    mixed_step_fit_backlog_tokens: int = 0,
    admission_reserve_tokens: int = 0,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            long_prefill_token_threshold=long_prefill_token_threshold,
            mixed_step_token_cap=mixed_step_token_cap,
            mixed_step_fit_backlog_tokens=mixed_step_fit_backlog_tokens,
            admission_reserve_tokens=admission_reserve_tokens,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            async_scheduling=True,
            max_waiting_requests=1024,
            max_waiting_tokens=1 << 20,
        ),
        CacheConfig(
            block_size=BS,
            kv_cache_dtype="float32",
            enable_prefix_caching=prefix_caching,
            gpu_memory_utilization=0.9,
            cpu_kv_cache_gb=1.0,
            num_kv_blocks_override=None,
            num_kv_blocks=num_kv_blocks,
        ),
    )


def make_req(
    req_id: str, prompt: list[int], priority: int = 0, salt: str | None = None, **sp: object
) -> Request:
    params = SamplingParams(**sp)  # type: ignore[arg-type]
    return Request(req_id, list(prompt), params, priority=priority, cache_salt=salt)


def next_token(context: list[int]) -> int:
    """The fake model: deterministic in the whole context, never a stop token (those are < 10)."""
    h = 0
    for t in context:
        h = (h * 1_000_003 + t) % 2_147_483_647
    return 10 + h % 990


def expected_outputs(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int = BS) -> None:
        self.bs = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.state: dict[str, dict] = {}

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.state.pop(rid, None)
        for nr in so.new_requests:
            assert nr.req_id not in self.state
            self.state[nr.req_id] = {
                "tokens": list(nr.token_ids),
                "blocks": list(nr.block_ids),
                "computed": nr.num_computed_tokens,
            }
        for cr in so.cached_requests:
            st = self.state[cr.req_id]
            assert st["computed"] == cr.num_computed_tokens
            st["blocks"].extend(cr.new_block_ids)
        assert set(so.num_scheduled_tokens) == {r.req_id for r in so.new_requests} | {
            r.req_id for r in so.cached_requests
        }
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        # Every layer writes the whole batch's KV before any attention reads it.
        for rid, n in so.num_scheduled_tokens.items():
            st = self.state[rid]
            start = st["computed"]
            assert n > 0 and start + n <= len(st["tokens"])
            assert len(st["blocks"]) * self.bs >= start + n
            for pos in range(start, start + n):
                self.kv[st["blocks"][pos // self.bs]][pos % self.bs] = st["tokens"][pos]
        sampled: dict[str, list[int]] = {}
        for rid, n in so.num_scheduled_tokens.items():
            st = self.state[rid]
            end = st["computed"] + n
            context = [self.kv[st["blocks"][p // self.bs]][p % self.bs] for p in range(end)]
            assert context == st["tokens"][:end], f"{rid}: KV cache holds the wrong tokens"
            st["computed"] = end
            if end == len(st["tokens"]):
                tok = next_token(context)
                st["tokens"].append(tok)
                sampled[rid] = [tok]
            else:
                sampled[rid] = []  # a prefill chunk that did not reach the end
        return ModelRunnerOutput(sampled_token_ids=sampled)


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[tuple[Request, list[int]]]]:
    so = sched.schedule()
    return so, sched.update_from_output(so, runner.execute(so))


def run_to_completion(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> int:
    for i in range(max_steps):
        if not sched.has_unfinished_requests():
            return i
        step(sched, runner)
    raise AssertionError(f"not finished after {max_steps} steps: possible deadlock")


def assert_all_blocks_free(sched: Scheduler) -> None:
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert kv.req_to_blocks == {}
    assert sched.kv_cache_usage == 0.0


# ---------------------------------------------------------------- admission
# Validation (empty prompts, context length, KV cache capacity) is the input processor's:
# tests/engine/test_input_processor.py. The scheduler trusts the request.
def test_scheduler_never_modifies_a_requests_parameters() -> None:
    """Through admission, chunked prefill, preemption, recompute and finishing, every field of every
    request's SamplingParams stays as it was given."""
    sched, runner = make_sched(num_kv_blocks=6, prefix_caching=False, budget=8), FakeRunner(6)
    reqs = [
        make_req("a", list(range(30, 42)), max_tokens=12, stop_token_ids=[3], seed=5),
        make_req("b", list(range(50, 62)), max_tokens=12, logit_bias={7: 1.0}),
        make_req("c", list(range(70, 78)), max_tokens=4, min_tokens=2, stop=["x"]),
    ]
    before = [
        {name: repr(getattr(r.sampling_params, name)) for name in SamplingParams.__slots__} for r in reqs
    ]
    for r in reqs:
        sched.add_request(r)
    run_to_completion(sched, runner)
    assert sched.num_preemptions >= 1  # the run went through preemption and recompute
    after = [
        {name: repr(getattr(r.sampling_params, name)) for name in SamplingParams.__slots__} for r in reqs
    ]
    assert after == before
    assert [r.num_output_tokens for r in reqs] == [12, 12, 4]


def test_duplicate_request_id_is_rejected() -> None:
    sched = make_sched()
    sched.add_request(make_req("a", [1, 2]))
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        sched.add_request(make_req("a", [3, 4]))


# ---------------------------------------------------------------- scheduling
def test_single_request_prefill_then_decode_to_max_tokens() -> None:
    sched, runner = make_sched(), FakeRunner(64)
    prompt = list(range(20, 40))
    req = make_req("a", prompt, max_tokens=5)
    sched.add_request(req)
    assert sched.num_waiting_tokens == 20
    so, out = step(sched, runner)
    assert [r.req_id for r in so.new_requests] == ["a"]
    assert so.new_requests[0].block_ids == [0, 1, 2]
    assert so.num_scheduled_tokens == {"a": 20}
    assert req.first_scheduled_time is not None and req.first_token_time is not None
    assert sched.num_waiting_tokens == 0 and sched.num_running == 1
    so, out = step(sched, runner)
    assert so.new_requests == [] and so.cached_requests[0].num_computed_tokens == 20
    assert so.num_scheduled_tokens == {"a": 1}
    run_to_completion(sched, runner)
    assert req.output_token_ids == expected_outputs(prompt, 5)
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert sched.schedule().finished_req_ids == {"a"}
    assert sched.schedule().finished_req_ids == set()  # reported once
    assert_all_blocks_free(sched)


def test_chunked_prefill_splits_a_long_prompt_while_decodes_go_first() -> None:
    sched, runner = make_sched(budget=8), FakeRunner(64)
    short = make_req("short", [5] * 4, max_tokens=20)
    sched.add_request(short)
    step(sched, runner)  # short's prefill; now it decodes
    long_prompt = list(range(100, 130))  # 30 tokens
    long = make_req("long", long_prompt, max_tokens=3)
    sched.add_request(long)
    chunks = []
    while long.num_output_tokens == 0:
        so, _ = step(sched, runner)
        assert so.num_scheduled_tokens["short"] == 1  # the stream keeps flowing every step
        assert list(so.num_scheduled_tokens)[0] == "short"
        assert so.total_num_scheduled_tokens <= 8
        chunks.append(so.num_scheduled_tokens["long"])
    assert chunks == [7, 7, 7, 7, 2]
    assert sum(chunks) == 30
    run_to_completion(sched, runner)
    assert long.output_token_ids == expected_outputs(long_prompt, 3)
    assert short.output_token_ids == expected_outputs([5] * 4, 20)
    assert_all_blocks_free(sched)


def test_long_prefill_token_threshold_caps_each_prompt_chunk() -> None:
    # Budget 64, threshold 10: two long prompts arriving together each compute at most 10 tokens a
    # step (20 of the 64), the running stream decodes every step, and every output is right.
    sched, runner = make_sched(budget=64, long_prefill_token_threshold=10), FakeRunner(64)
    short = make_req("short", [5] * 4, max_tokens=12)
    sched.add_request(short)
    step(sched, runner)
    prompts = {"a": list(range(100, 125)), "b": list(range(200, 207))}  # 25 and 7 tokens
    reqs = {rid: make_req(rid, prompt, max_tokens=3) for rid, prompt in prompts.items()}
    for req in reqs.values():
        sched.add_request(req)
    steps = []
    while reqs["a"].num_output_tokens == 0:
        so, _ = step(sched, runner)
        assert so.num_scheduled_tokens["short"] == 1
        steps.append({rid: so.num_scheduled_tokens.get(rid, 0) for rid in prompts})
    assert steps == [{"a": 10, "b": 7}, {"a": 10, "b": 1}, {"a": 5, "b": 1}]  # b decodes once its 7 are in
    run_to_completion(sched, runner)
    for rid, prompt in prompts.items():
        assert reqs[rid].output_token_ids == expected_outputs(prompt, 3)
    assert short.output_token_ids == expected_outputs([5] * 4, 12)
    assert_all_blocks_free(sched)


def test_mixed_steps_fit_the_largest_mixed_graph_when_decodes_share_them() -> None:
    # Budget 64, mixed graphs up to 16 tokens (fit_mixed_steps_to_cuda_graphs): with two streams
    # decoding, a 30-token prompt goes in chunks of 14, so every step holds 16 tokens, not 32; a
    # prompt alone in its step still takes the whole budget.
    sched, runner = make_sched(budget=64, mixed_step_token_cap=16), FakeRunner(64)
    alone = make_req("alone", list(range(300, 340)), max_tokens=2)  # 40 tokens, no decodes beside it
    sched.add_request(alone)
    so, _ = step(sched, runner)
    assert so.num_scheduled_tokens == {"alone": 40}
    run_to_completion(sched, runner)
    streams = [make_req(f"s{i}", [5 + i] * 4, max_tokens=12) for i in range(2)]
    for s in streams:
        sched.add_request(s)
    step(sched, runner)  # their prefills; now they decode
    long_prompt = list(range(100, 130))  # 30 tokens
    long = make_req("long", long_prompt, max_tokens=3)
    sched.add_request(long)
    totals, chunks = [], []
    while long.num_output_tokens == 0:
        so, _ = step(sched, runner)
        assert so.num_scheduled_tokens["s0"] == so.num_scheduled_tokens["s1"] == 1
        totals.append(so.total_num_scheduled_tokens)
        chunks.append(so.num_scheduled_tokens["long"])
    assert chunks == [14, 14, 2] and totals == [16, 16, 4]
    # Two prompts arriving together beside the streams: the step stays at 16; the second prompt
    # waits until the first one's chunks leave room.
    pair = {
        rid: make_req(rid, list(range(base, base + 20)), max_tokens=2)
        for rid, base in (("p", 400), ("q", 500))
    }
    for req in pair.values():
        sched.add_request(req)
    steps = []
    while any(r.num_output_tokens == 0 for r in pair.values()):
        so, _ = step(sched, runner)
        assert so.num_scheduled_tokens["s0"] == so.num_scheduled_tokens["s1"] == 1
        steps.append(
            (
                so.total_num_scheduled_tokens,
                so.num_scheduled_tokens.get("p", 0),
                so.num_scheduled_tokens.get("q", 0),
            )
        )
    assert all(total <= 16 for total, _, _ in steps), steps
    assert all(total <= 16 for total, _, _ in steps), steps
    # First step: the three decodes (the streams, "long") and 13 of p's 20; q waits, then fills the rest.
    assert steps[0] == (16, 13, 0) and steps[1] == (16, 7, 6), steps
    run_to_completion(sched, runner)
    assert long.output_token_ids == expected_outputs(long_prompt, 3)
    for rid, base in (("p", 400), ("q", 500)):
        assert pair[rid].output_token_ids == expected_outputs(list(range(base, base + 20)), 2)
    for i, s in enumerate(streams):
        assert s.output_token_ids == expected_outputs([5 + i] * 4, 12)
    assert_all_blocks_free(sched)


def _two_streams_then_three_prompts(sched: Scheduler, runner: FakeRunner) -> tuple[dict, dict]:
    """Two streams prefilled (decoding from the next step), then three 30-token prompts queued."""
    streams = [make_req(f"s{i}", [5 + i] * 4, max_tokens=12) for i in range(2)]
    for s in streams:
        sched.add_request(s)
    step(sched, runner)  # their prefills; now they decode
    prompts = {f"p{i}": list(range(100 + 40 * i, 130 + 40 * i)) for i in range(3)}
    reqs = {rid: make_req(rid, prompt, max_tokens=2) for rid, prompt in prompts.items()}
    for req in reqs.values():
        sched.add_request(req)
    return prompts, reqs


def test_mixed_step_cut_waits_until_the_prompt_backlog_fits_one_step() -> None:
    # Budget 64, mixed graphs up to 16 tokens. Three 30-token prompts arrive beside two decoding
    # streams: 90 prompt tokens are more than one full step, so the step takes the whole budget (the
    # cut would only slow a queue that is already waiting); once the backlog fits one step (28 left),
    # steps are cut to the graph again.
    sched, runner = make_sched(budget=64, mixed_step_token_cap=16), FakeRunner(64)
    prompts, reqs = _two_streams_then_three_prompts(sched, runner)
    so, _ = step(sched, runner)
    assert so.total_num_scheduled_tokens == 64
    assert so.num_scheduled_tokens == {"s0": 1, "s1": 1, "p0": 30, "p1": 30, "p2": 2}
    so, _ = step(sched, runner)  # 28 of p2's tokens left: cut to the graph, 12 beside 4 decodes
    assert so.num_scheduled_tokens == {"s0": 1, "s1": 1, "p0": 1, "p1": 1, "p2": 12}
    run_to_completion(sched, runner)
    for rid, prompt in prompts.items():
        assert reqs[rid].output_token_ids == expected_outputs(prompt, 2)
    assert_all_blocks_free(sched)


def test_mixed_step_cut_applies_up_to_the_configured_backlog_past_one_step() -> None:
    # The same three 30-token prompts beside two decoding streams, but the cut applies up to a backlog
    # of 128 tokens (more than the 64-token step): every step stays within the 16-token graph from the
    # first one (the server's case: short steps, and a few prompts waiting must not turn the cut off).
    sched = make_sched(budget=64, mixed_step_token_cap=16, mixed_step_fit_backlog_tokens=128)
    runner = FakeRunner(64)
    prompts, reqs = _two_streams_then_three_prompts(sched, runner)
    so, _ = step(sched, runner)
    assert so.num_scheduled_tokens == {"s0": 1, "s1": 1, "p0": 14}
    totals = [so.total_num_scheduled_tokens]
    while any(r.num_output_tokens == 0 for r in reqs.values()):
        so, _ = step(sched, runner)
        totals.append(so.total_num_scheduled_tokens)
    assert max(totals) == 16, totals
    run_to_completion(sched, runner)
    for rid, prompt in prompts.items():
        assert reqs[rid].output_token_ids == expected_outputs(prompt, 2)
    assert_all_blocks_free(sched)


def test_max_num_seqs_bounds_running_requests() -> None:
    sched, runner = make_sched(max_num_seqs=2), FakeRunner(64)
    for i in range(4):
        sched.add_request(make_req(f"r{i}", [i + 1] * 3, max_tokens=2))
    so, _ = step(sched, runner)
    assert set(so.num_scheduled_tokens) == {"r0", "r1"}
    assert sched.num_running == 2 and sched.num_waiting == 2
    run_to_completion(sched, runner)
    assert_all_blocks_free(sched)


def test_prefix_cache_hit_is_reported_and_skips_computation() -> None:
    sched, runner = make_sched(), FakeRunner(64)
    prompt = list(range(200, 220))  # 2 full blocks + 4 tokens
    a = make_req("a", prompt, max_tokens=2)
    sched.add_request(a)
    run_to_completion(sched, runner)
    b = make_req("b", prompt + [7, 7], max_tokens=2)
    sched.add_request(b)
    so, _ = step(sched, runner)
    assert b.num_cached_tokens == 16 and a.num_cached_tokens == 0
    assert so.new_requests[0].num_computed_tokens == 16
    assert so.num_scheduled_tokens == {"b": 6}
    run_to_completion(sched, runner)
    assert b.output_token_ids == expected_outputs(prompt + [7, 7], 2)
    assert sched.prefix_cache_queries == 20 + 22
    assert sched.prefix_cache_hits == 16
    # Same prompt again: a whole-prompt hit still computes the last token.
    c = make_req("c", prompt + [7, 7], max_tokens=1)
    sched.add_request(c)
    so, _ = step(sched, runner)
    assert c.num_cached_tokens == 16 and so.num_scheduled_tokens == {"c": 6}
    d = make_req("d", list(prompt[:16]), max_tokens=1)  # prompt is exactly 2 cached blocks
    sched.add_request(d)
    so, _ = step(sched, runner)
    assert d.num_cached_tokens == 8 and so.num_scheduled_tokens == {"d": 8}
    run_to_completion(sched, runner)
    assert_all_blocks_free(sched)


def test_preemption_picks_the_latest_arrival_and_it_later_finishes_all_tokens() -> None:
    # 6 blocks of 8 tokens; each request needs up to 3 blocks (12 + 12 tokens), both can't grow.
    sched, runner = make_sched(num_kv_blocks=6, prefix_caching=False), FakeRunner(6)
    pa, pb = list(range(30, 42)), list(range(50, 62))
    a = make_req("a", pa, max_tokens=12)
    b = make_req("b", pb, max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, runner)
    step(sched, runner)
    # Both grow into their third block by token 17; 6 blocks can't hold two 3-block tables + c.
    c = make_req("c", list(range(70, 78)), max_tokens=4)
    sched.add_request(c)
    preempted_steps = []
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        so, _ = step(sched, runner)
        if so.preempted_req_ids:
            preempted_steps.append(so.preempted_req_ids)
    assert preempted_steps, "the test must exercise preemption"
    assert "a" not in set().union(*preempted_steps)  # the earliest arrival is never the victim
    num_preempted = sum(len(ids) for ids in preempted_steps)
    assert sched.num_preemptions == sum(r.num_preemptions for r in (a, b, c)) == num_preempted
    for req, prompt, n in ((a, pa, 12), (b, pb, 12), (c, list(range(70, 78)), 4)):
        assert req.output_token_ids == expected_outputs(prompt, n)
        assert req.status == RequestStatus.FINISHED_LENGTH
    assert_all_blocks_free(sched)


def test_preempted_request_resumes_with_its_outputs_ahead_of_later_arrivals() -> None:
    # 4 blocks of 8 tokens: a (12 + 12) and b (10 + 12) each fill 2 blocks after prefill, and
    # whichever needs a third block first forces b, the later arrival, out.
    sched, runner = make_sched(num_kv_blocks=4, prefix_caching=False), FakeRunner(4)
    a = make_req("a", [1] * 12, max_tokens=12)
    b = make_req("b", [2] * 10, max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(50):
        so, _ = step(sched, runner)
        if so.preempted_req_ids:
            break
    assert so.preempted_req_ids == {"b"}
    assert "b" not in so.num_scheduled_tokens
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert sched.kv_cache_manager.get_block_ids("b") == []
    assert sched.num_waiting == 1 and sched.num_waiting_tokens == 10
    outputs_before = list(b.output_token_ids)
    assert outputs_before
    late = make_req("late", [3] * 4, max_tokens=1)
    sched.add_request(late)
    admitted: list[str] = []
    resumed = None
    while resumed is None:
        so, _ = step(sched, runner)
        admitted += [nr.req_id for nr in so.new_requests]
        resumed = next((nr for nr in so.new_requests if nr.req_id == "b"), None)
    assert admitted[0] == "b"  # the later arrival does not jump ahead of it
    assert resumed.token_ids == [2] * 10 + outputs_before  # recomputed from all its tokens
    assert resumed.num_prompt_tokens == 10 and resumed.num_computed_tokens == 0
    assert b.num_cached_tokens == 0  # recorded at first scheduling only
    run_to_completion(sched, runner)
    assert a.output_token_ids == expected_outputs([1] * 12, 12)
    assert b.output_token_ids == expected_outputs([2] * 10, 12)
    assert late.output_token_ids == expected_outputs([3] * 4, 1)
    assert_all_blocks_free(sched)


def test_a_request_alone_in_a_full_cache_never_deadlocks() -> None:
    sched, runner = make_sched(num_kv_blocks=3, budget=4, prefix_caching=False), FakeRunner(3)
    reqs = [make_req(f"r{i}", [i + 1] * 10, max_tokens=14) for i in range(3)]  # 24 tokens = 3 blocks
    for r in reqs:
        sched.add_request(r)
    run_to_completion(sched, runner, max_steps=2_000)
    for i, r in enumerate(reqs):
        assert r.output_token_ids == expected_outputs([i + 1] * 10, 14)
    assert_all_blocks_free(sched)


# ---------------------------------------------------------------- priority
def test_priority_orders_the_waiting_queue_and_ties_keep_arrival_order() -> None:
    sched, runner = make_sched(max_num_seqs=1), FakeRunner(64)
    order = []
    for rid, prio in (("low", 5), ("first", 0), ("high", -1), ("second", 0)):
        sched.add_request(make_req(rid, [1, 2, 3], priority=prio, max_tokens=1))
    while sched.has_unfinished_requests():
        so, _ = step(sched, runner)
        order += [r.req_id for r in so.new_requests]
    assert order == ["high", "first", "second", "low"]


def test_preemption_victim_is_the_lowest_priority_then_latest() -> None:
    sched, runner = make_sched(num_kv_blocks=4, prefix_caching=False), FakeRunner(4)
    vip = make_req("vip", [1] * 7, priority=-1, max_tokens=20)
    bulk = make_req("bulk", [2] * 7, priority=3, max_tokens=20)
    sched.add_request(bulk)  # arrives first but matters less
    sched.add_request(vip)
    victims: set[str] = set()
    for _ in range(500):
        if not sched.has_unfinished_requests():
            break
        so, _ = step(sched, runner)
        victims |= so.preempted_req_ids
    assert victims == {"bulk"}
    assert vip.output_token_ids == expected_outputs([1] * 7, 20)
    assert bulk.output_token_ids == expected_outputs([2] * 7, 20)


# ---------------------------------------------------------------- stops
def test_stop_token_eos_and_min_tokens() -> None:
    sched = make_sched()
    a = make_req("a", [1, 2], stop_token_ids=[7], max_tokens=10)
    e = make_req("e", [1, 2], max_tokens=10)
    e.sampling_params.all_stop_token_ids = frozenset({2})  # the input processor adds eos
    m = make_req("m", [1, 2], stop_token_ids=[7], min_tokens=2, max_tokens=10)
    for r in (a, e, m):
        sched.add_request(r)
    so = sched.schedule()
    out = sched.update_from_output(so, ModelRunnerOutput({"a": [7], "e": [2], "m": [7]}))
    assert [(r.req_id, toks) for r, toks in out] == [("a", [7]), ("e", [2]), ("m", [7])]
    assert a.status == RequestStatus.FINISHED_STOPPED and a.stop_reason == 7
    assert e.status == RequestStatus.FINISHED_STOPPED and e.stop_reason is None
    assert m.status == RequestStatus.RUNNING  # 1 output <= min_tokens: no stop yet
    so = sched.schedule()
    assert so.finished_req_ids == {"a", "e"}
    sched.update_from_output(so, ModelRunnerOutput({"m": [7]}))
    assert m.status == RequestStatus.RUNNING
    so = sched.schedule()
    sched.update_from_output(so, ModelRunnerOutput({"m": [7]}))
    assert m.status == RequestStatus.FINISHED_STOPPED and m.output_token_ids == [7, 7, 7]
    assert_all_blocks_free(sched)


def test_tokens_after_a_stop_in_the_same_step_are_dropped() -> None:
    sched = make_sched()
    a = make_req("a", [1, 2], stop_token_ids=[7], max_tokens=10)
    sched.add_request(a)
    so = sched.schedule()
    [(req, toks)] = sched.update_from_output(so, ModelRunnerOutput({"a": [5, 7, 9]}))
    assert toks == [5, 7] and a.output_token_ids == [5, 7]


def test_length_stop_at_max_model_len() -> None:
    sched, runner = make_sched(max_model_len=12), FakeRunner(64)
    # The input processor caps max_tokens at the context; the scheduler's own bound holds regardless.
    r = make_req("a", [1] * 8, max_tokens=100)
    sched.add_request(r)
    run_to_completion(sched, runner)
    assert r.num_output_tokens == 4 and r.num_tokens == 12
    assert r.status == RequestStatus.FINISHED_LENGTH and r.status.finish_reason == "length"


# ---------------------------------------------------------------- aborts
@pytest.mark.parametrize("phase", ["waiting", "mid_prefill", "mid_decode"])
def test_abort_frees_blocks(phase: str) -> None:
    sched, runner = make_sched(budget=8), FakeRunner(64)
    other = make_req("other", [9] * 3, max_tokens=30)
    victim = make_req("v", list(range(40)), max_tokens=30)
    sched.add_request(other)
    sched.add_request(victim)
    if phase != "waiting":
        step(sched, runner)
        assert victim.status == RequestStatus.RUNNING and 0 < victim.num_computed_tokens < 40
    if phase == "mid_decode":
        while victim.num_output_tokens < 2:
            step(sched, runner)
    sched.finish_requests("v", RequestStatus.FINISHED_ABORTED)
    assert victim.status == RequestStatus.FINISHED_ABORTED
    assert sched.kv_cache_manager.get_block_ids("v") == []
    assert sched.get_request("v") is None
    assert sched.num_waiting_tokens == (3 if phase == "waiting" else 0)  # only "other" may wait
    sched.finish_requests(["v", "unknown"], RequestStatus.FINISHED_ABORTED)  # ignored
    so, _ = step(sched, runner)
    assert "v" in so.finished_req_ids and "v" not in so.num_scheduled_tokens
    run_to_completion(sched, runner)
    assert other.output_token_ids == expected_outputs([9] * 3, 30)
    assert_all_blocks_free(sched)


def test_abort_between_schedule_and_update_drops_the_tokens() -> None:
    sched, runner = make_sched(), FakeRunner(64)
    a = make_req("a", [1, 2, 3], max_tokens=5)
    sched.add_request(a)
    so = sched.schedule()
    ro = runner.execute(so)
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(so, ro) == []
    assert a.output_token_ids == [] and not sched.has_unfinished_requests()
    assert_all_blocks_free(sched)


def test_finish_requests_needs_a_finished_status() -> None:
    with pytest.raises(ValueError, match="finish_requests needs a finished status; got RUNNING"):
        make_sched().finish_requests(["a"], RequestStatus.RUNNING)


# ---------------------------------------------------------------- the whole thing
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("reserve", [0, 16])  # admission_reserve_tokens: none (preempt to grow), or some
def test_random_workload_under_tight_blocks_runs_to_completion(
    seed: int, prefix_caching: bool, reserve: int
) -> None:
    rng = random.Random(seed)
    num_blocks = 24
    sched = make_sched(
        num_kv_blocks=num_blocks,
        budget=rng.choice([8, 16, 48]),
        max_num_seqs=6,
        prefix_caching=prefix_caching,
        admission_reserve_tokens=reserve,
    )
    runner = FakeRunner(num_blocks)
    shared = [[rng.randrange(10, 1000) for _ in range(rng.randrange(4, 30))] for _ in range(3)]
    reqs: list[tuple[Request, list[int]]] = []
    pending = []
    for i in range(40):
        prompt = list(rng.choice(shared))[: rng.randrange(1, 30)] + [
            rng.randrange(10, 1000) for _ in range(rng.randrange(0, 20))
        ]
        max_tokens = rng.randrange(1, 40)
        req = make_req(
            f"r{i}",
            prompt,
            priority=rng.choice([0, 0, 0, 1, -1]),
            salt=rng.choice([None, None, "t1"]),
            max_tokens=max_tokens,
        )
        pending.append((rng.randrange(0, 60), req, prompt))
    pending.sort(key=lambda p: p[0])
    steps = 0
    aborted = set()
    while (pending or sched.has_unfinished_requests()) and steps < 5_000:
        while pending and pending[0][0] <= steps:
            _, req, prompt = pending.pop(0)
            sched.add_request(req)
            reqs.append((req, prompt))
        if steps == 30 and sched.num_running:
            rid = next(iter(sched.running))
            sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        so, _ = step(sched, runner)
        assert so.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert sched.num_running <= 6
        # Reference counts match the block tables exactly.
        refs = [0] * num_blocks
        for blocks in sched.kv_cache_manager.req_to_blocks.values():
            for b in blocks:
                refs[b.block_id] += 1
        assert refs == [b.ref_cnt for b in sched.kv_cache_manager.block_pool.blocks]
        assert sched.kv_cache_manager.num_free_blocks == refs.count(0)
        steps += 1
    assert not pending and not sched.has_unfinished_requests(), "deadlock or livelock"
    for req, prompt in reqs:
        if req.req_id in aborted:
            assert req.status == RequestStatus.FINISHED_ABORTED
            continue
        assert req.status == RequestStatus.FINISHED_LENGTH
        assert req.output_token_ids == expected_outputs(prompt, req.sampling_params.max_tokens)
    assert_all_blocks_free(sched)
    if not reserve:  # with a reserve, running requests may never have to preempt one another
        assert sched.num_preemptions > 0  # the cache is tight enough to exercise preemption
    if prefix_caching:
        assert sched.prefix_cache_hits > 0
        assert sched.kv_cache_manager.block_pool.num_cached_blocks > 0  # cached, yet free
    else:
        assert sched.prefix_cache_hits == 0


def test_a_failed_forward_pass_leaves_no_prefix_cache_entries_behind() -> None:
    sched = make_sched()
    prompt = list(range(300, 320))
    sched.add_request(make_req("a", prompt, max_tokens=2))
    sched.schedule()  # blocks registered for hits, but the forward pass then fails
    sched.finish_requests(["a"], RequestStatus.FINISHED_ERROR)
    assert_all_blocks_free(sched)
    b = make_req("b", prompt, max_tokens=2)
    sched.add_request(b)
    so = sched.schedule()
    assert b.num_cached_tokens == 0 and so.num_scheduled_tokens == {"b": 20}
