"""Beam search ranked on the device (engine/core/beam_device.py, engine/worker/beam_device.py) against
the host's ranking, which tests/engine/test_beam_search.py holds token for token to transformers:
many groups of different widths and lengths at once, prompts that end on a block boundary and inside
one, outputs that cross several boundaries, stop tokens, every early-stopping rule, prompts chunked
beside the beams' steps, and a group aborted while its step is in flight."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.config import CacheConfig, SchedulerConfig
from engine.core.request import Request, RequestStatus
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import ModelRunnerOutput

# (prompt length, width, max_tokens, early_stopping, length_penalty, stop token ids)
GROUPS = [
    (8, 4, 20, False, 1.0, []),  # the prompt fills its last block: the first step is a boundary
    (16, 2, 20, True, 0.5, []),
    (5, 3, 20, "never", 2.0, []),
    (13, 4, 19, False, 1.0, [7, 11]),  # stop tokens: hypotheses end early, 3 x 4 candidates a step
    (9, 1, 12, False, 1.0, []),  # width 1: greedy
    (30, 4, 17, True, 1.0, [3]),
]


def _params(width: int, max_tokens: int, early, lp: float, stops: list[int]) -> SamplingParams:
    return SamplingParams(
        n=width,
        use_beam_search=True,
        temperature=0.0,
        max_tokens=max_tokens,
        early_stopping=early,
        length_penalty=lp,
        stop_token_ids=stops,
        ignore_eos=True,
    )


def _prompt(length: int, seed: int) -> list[int]:
    return [1] + [(seed * 37 + i * 11) % 400 + 20 for i in range(length - 1)]


def _run(llm: LLM) -> list[list[tuple[list[int], float]]]:
    prompts = [_prompt(n, i) for i, (n, *_) in enumerate(GROUPS)]
    params = [_params(w, t, e, lp, s) for _, w, t, e, lp, s in GROUPS]
    outs = llm.generate(prompts, params, use_tqdm=False)
    kv = llm.llm_engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
    return [[(list(c.token_ids), c.cumulative_logprob) for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def host_beams(tiny_llama_dir: Path) -> list:
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=8, beam_device_ranking=False)
    beams = _run(llm)
    llm.shutdown()
    return beams


@pytest.mark.parametrize(("budget", "async_scheduling"), [(None, True), (16, True), (None, False)])
def test_device_ranking_gives_the_host_rankings_beams(
    tiny_llama_dir: Path, host_beams, budget, async_scheduling
) -> None:
    """Every group's beams (tokens and cumulative log-probabilities) as the host ranks them; with a
    16-token step budget the prompts are chunked and share steps with the beams'; without async
    scheduling the host replays each step before the next is scheduled."""
    extra = {"max_num_batched_tokens": budget, "long_prefill_token_threshold": 8} if budget else {}
    extra["async_scheduling"] = async_scheduling
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=8, **extra)
    started = []
    start = llm.llm_engine.scheduler.start_device_group
    llm.llm_engine.scheduler.start_device_group = lambda *a: started.append(start(*a)) or started[-1]
    got = _run(llm)
    assert len(started) == len(GROUPS) and all(started)
    # Stop tokens ended the best hypothesis of some group before max_tokens.
    assert any(len(beams[0][0]) < group[2] for beams, group in zip(got, GROUPS, strict=True))
    for dev, host in zip(got, host_beams, strict=True):
        assert [t for t, _ in dev] == [t for t, _ in host]
        assert [lp for _, lp in dev] == pytest.approx([lp for _, lp in host], rel=1e-6)  # float32 sums
    llm.shutdown()


def test_abort_with_a_device_step_in_flight_frees_every_block(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=8)
    engine = llm.llm_engine
    engine.add_request("a", _prompt(8, 1), _params(4, 30, False, 1.0, []))
    engine.add_request("b", _prompt(11, 2), _params(2, 30, False, 1.0, []))
    kv = engine.scheduler.kv_cache_manager
    for _ in range(6):
        engine.step()
    assert len(engine.scheduler._device_groups) == 2
    assert engine.scheduler.num_running == 4 + 2  # every beam is a running sequence (metrics, profiles)
    # Held: the prompts' blocks, each group's tails and the boundary copies its beams hold.
    groups = engine.scheduler._device_groups.values()
    held = 1 + 2 + sum(len(g.tail_blocks) + len(g.copies) for g in groups)
    assert kv.num_blocks - kv.num_free_blocks == held
    engine.abort_request(["a"])
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert sorted(finished) == ["b"] and len(finished["b"].outputs) == 2
    assert kv.num_free_blocks == kv.num_blocks
    assert not engine.scheduler._device_groups
    # The runner drops the ended groups' rows with the next step it runs.
    pool = engine.executor.runner._beam_pool
    assert pool is not None and len(pool) == 1
    llm.generate([_prompt(4, 3)], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(pool) == 0 and len(pool._free_rows) == engine.scheduler.max_num_seqs
    llm.shutdown()


def test_a_group_short_of_blocks_starts_again_ranked_on_the_host(tiny_llama_dir: Path, host_beams) -> None:
    """A cache too small for every group's boundary copies: with no request ranked the host's way left
    to preempt, the device-ranked group that arrived last gives its blocks back and starts again from
    its prompt, ranked on the host; every group's beams are still the host ranking's, every block and
    pool row comes back."""
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=8, num_kv_blocks=40)
    engine = llm.llm_engine
    restarted = []
    callback = engine.scheduler.on_device_group_restart
    engine.scheduler.on_device_group_restart = lambda leader: (
        restarted.append(leader.req_id),
        callback(leader),
    )
    got = _run(llm)
    assert restarted and engine.scheduler.num_preemptions >= len(restarted)
    for dev, host in zip(got, host_beams, strict=True):
        assert [t for t, _ in dev] == [t for t, _ in host]
    llm.shutdown()


def test_a_group_started_again_in_the_step_that_gave_it_a_step_loses_that_step() -> None:
    """Blocks of 4, the cache full after two groups took their tails: the first group (earlier
    arrival, later handed to the device) reaches a block boundary after the second group was given
    its step; with no host-ranked request to preempt, the second group starts again: its step goes,
    its blocks come back, the runner is told to drop its rows."""
    sched = Scheduler(
        SchedulerConfig(
            max_num_seqs=16,
            max_num_batched_tokens=64,
            max_model_len=64,
            async_scheduling=True,
            max_waiting_requests=16,
            max_waiting_tokens=1024,
            beam_device_ranking=True,
        ),
        CacheConfig(
            block_size=4,
            kv_cache_dtype="float32",
            enable_prefix_caching=False,
            gpu_memory_utilization=0.9,
            cpu_kv_cache_gb=1.0,
            num_kv_blocks_override=None,
            num_kv_blocks=10,
        ),
    )
    restarted = []
    sched.on_device_group_restart = restarted.append
    # B arrives after A but goes to the device first, so each step lists B's step before A's.
    a_prompt, b_prompt = [1, 2, 3], [4, 5]
    a_params, b_params = _params(2, 10, False, 1.0, []), _params(2, 10, False, 1.0, [])
    a = [Request(f"a#beam{i}", a_prompt, a_params, is_beam=True) for i in range(2)]
    b = [Request(f"b#beam{i}", b_prompt, b_params, is_beam=True) for i in range(2)]
    for g in (a, b):
        for slot in g:
            slot.group = g
        sched.add_beam_group(g)
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"a#beam0": 3, "b#beam0": 2}
    sched.update_from_output(so, ModelRunnerOutput({"a#beam0": [0], "b#beam0": [0]}))
    b_id = sched.start_device_group(b, [7, 8], [-1.0, -2.0], [], 4)
    a_id = sched.start_device_group(a, [7, 8], [-1.0, -2.0], [], 4)
    kv = sched.kv_cache_manager
    assert b_id and a_id and kv.num_free_blocks == 0  # 2 prompts + 2 x 4 tails
    so = sched.schedule()  # B at position 2, A at 3: inside their first blocks
    assert [(s.group_id, s.position) for s in so.beam_steps] == [(b_id, 2), (a_id, 3)]
    so = sched.schedule()  # B at 3; A at 4, a boundary: 2 copies, none free, B goes
    assert [(s.group_id, s.position, len(s.full_blocks)) for s in so.beam_steps] == [(a_id, 4, 2)]
    assert so.finished_beam_groups == [b_id] and so.total_num_scheduled_tokens == 2
    assert restarted == [b[0]] and b[0].status == RequestStatus.PREEMPTED
    # B gave back its prompt block and 4 tails; A took 2 of them for its copies.
    assert sched.num_preemptions == 1 and kv.num_free_blocks == 3


@pytest.mark.parametrize(("seed", "reserve"), [(0, 0), (1, 0), (2, 0), (3, 0), (0, 128), (1, 128)])
def test_random_mix_under_a_tight_cache_matches_the_host_ranking(
    tiny_llama_dir: Path, seed: int, reserve: int
) -> None:
    """Beam groups of random widths, lengths and stop tokens beside sampled requests, some aborted at
    random steps, in a cache tight enough for preemptions and device groups starting again: every
    finished beam search gives the host ranking's beams, and every block comes back. With admission's
    reserve (the default 128) too: beams are admitted without it, and nothing waits forever."""
    import random

    rng = random.Random(seed)
    requests = []
    for i in range(10):
        prompt = _prompt(rng.randint(3, 20), 100 * seed + i)
        if rng.random() < 0.6:
            params = _params(rng.randint(1, 4), rng.randint(2, 18), rng.choice([True, False, "never"]),
                             rng.choice([0.5, 1.0]), rng.sample(range(3, 40), rng.randint(0, 2)))  # fmt: skip
        else:
            params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 24), ignore_eos=True)
        requests.append((f"r{i}", prompt, params, rng.randint(1, 12) if rng.random() < 0.2 else None))

    def run(device_ranking: bool) -> dict:
        llm = LLM(
            str(tiny_llama_dir), device="cpu", dtype="float32", block_size=8, num_kv_blocks=20,
            max_num_batched_tokens=24, beam_device_ranking=device_ranking, admission_reserve_tokens=reserve,
        )  # fmt: skip
        engine = llm.llm_engine
        finals, step = {}, 0
        for rid, prompt, params, _ in requests:
            engine.add_request(rid, prompt, params)
        while engine.has_unfinished_requests():
            step += 1
            engine.abort_request([rid for rid, _, _, at in requests if at == step])
            finals.update((o.request_id, o) for o in engine.step() if o.finished)
        kv = engine.scheduler.kv_cache_manager
        assert kv.num_free_blocks == kv.num_blocks and not engine.scheduler.requests
        assert (engine.scheduler._next_group_serial > 0) == device_ranking  # groups went to the device
        preemptions.append(engine.scheduler.num_preemptions)
        llm.shutdown()
        return {
            rid: [list(c.token_ids) for c in out.outputs]
            for rid, out in finals.items()
            if out.outputs and out.outputs[0].finish_reason != "abort"
        }

    preemptions: list[int] = []
    device, host = run(True), run(False)
    if not reserve:
        assert max(preemptions) > 0  # the cache was tight: the four seeds preempt 1-11 times
    aborted = {rid for rid, *_, at in requests if at is not None}
    assert {rid for rid, *_ in requests} - aborted <= set(device) & set(host)
    for rid in set(device) & set(host):
        assert device[rid] == host[rid], rid
