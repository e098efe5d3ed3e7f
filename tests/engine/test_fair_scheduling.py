"""scheduling_policy="fair" (engine/core/fair_queue.py): one adapter sending ten times the other's load
must not grow the light adapter's queueing delay, as it does in arrival order.

A simulation without a model: the scheduler is driven with fake step outputs (one token per request
that reaches the end of its tokens), time is counted in steps, and the server is overloaded (the
heavy tenant alone asks for more than the engine serves), so the waiting queue keeps growing.
"""

from __future__ import annotations

from statistics import mean

import pytest

from engine.config import CacheConfig, SchedulerConfig
from engine.core.fair_queue import FairQueue
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import ModelRunnerOutput
from engine.lora.request import LoRARequest

HEAVY = LoRARequest("heavy", 1, "/adapters/heavy")
LIGHT = LoRARequest("light", 2, "/adapters/light")
PROMPT_LEN = 16
MAX_TOKENS = 4
STEPS = 400


def _scheduler(policy: str, base_share: float = 1.0) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=6,
            max_num_batched_tokens=64,
            max_model_len=256,
            async_scheduling=False,
            max_waiting_requests=1 << 20,
            max_waiting_tokens=1 << 30,
            scheduling_policy=policy,
            fair_base_share=base_share,
        ),
        CacheConfig(
            block_size=16,
            kv_cache_dtype="float32",
            enable_prefix_caching=False,
            gpu_memory_utilization=0.9,
            cpu_kv_cache_gb=1.0,
            num_kv_blocks_override=None,
            num_kv_blocks=4096,
        ),
    )


def _request(req_id: str, lora: LoRARequest | None, priority: int = 0) -> Request:
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    return Request(req_id, [11] * PROMPT_LEN, params, priority=priority, lora_request=lora)


def _simulate(policy: str) -> dict[str, list[int]]:
    """Queueing delay in steps (first scheduled - arrival) of each tenant's requests, in arrival order.

    Heavy sends 2 requests every step, light 1 every 5 steps (10x); the engine finishes at most
    6 sequences per 4 steps (a 16-token prompt step that samples the first token, then 3 decodes), i.e.
    1.5 requests per step."""
    sched = _scheduler(policy)
    arrived: dict[str, tuple[str, int]] = {}  # req_id -> (tenant, arrival step)
    delays: dict[str, list[int]] = {"heavy": [], "light": []}
    for step in range(STEPS):
        new = [(f"h{step}-{i}", HEAVY) for i in range(2)]
        if step % 5 == 0:
            new.append((f"l{step}", LIGHT))
        for req_id, lora in new:
            sched.add_request(_request(req_id, lora))
            arrived[req_id] = (lora.lora_name, step)
        out = sched.schedule()
        for new_req in out.new_requests:
            tenant, at = arrived[new_req.req_id]
            delays[tenant].append(step - at)
        scheduled = sched.scheduled_requests(out)
        sampled = {rid: [42] for rid, r in scheduled.items() if r.num_output_placeholders}
        sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return delays


def test_light_tenant_delay_stays_bounded_under_fair_and_grows_under_fcfs() -> None:
    fcfs = _simulate("fcfs")
    fair = _simulate("fair")
    # FCFS: the light tenant waits behind the heavy one's backlog, which grows every step.
    n = len(fcfs["light"])
    assert n >= 40
    early, late = mean(fcfs["light"][: n // 4]), mean(fcfs["light"][-n // 4 :])
    assert late > 50 and late > 3 * early, (early, late)
    # Fair: admitted within a few steps (a sequence slot frees every few steps), from first to last.
    assert len(fair["light"]) == STEPS // 5  # every light request was admitted
    assert max(fair["light"]) <= 5, fair["light"]
    # ... and the heavy tenant gets the rest of the engine, so its own backlog is what waits.
    assert len(fair["heavy"]) >= len(fcfs["heavy"]) - STEPS // 5
    assert mean(fair["heavy"][-20:]) > 50


def test_counters_charge_weighted_tokens_and_lift_new_tenants() -> None:
    q = FairQueue()
    a1, a2 = _request("a1", HEAVY), _request("a2", HEAVY)
    q.push(a1, 0)
    q.push(a2, 1)
    assert q.peek() is a1
    q.pop(a1)
    a1.num_computed_tokens = PROMPT_LEN  # its whole prompt computed in one step
    q.charge([a1], {"a1": PROMPT_LEN})
    a1.num_computed_tokens += 1  # then a decode step
    q.charge([a1], {"a1": 1})
    assert q.counters[1] == PROMPT_LEN * 1.0 + 1 * 2.0
    # A tenant that starts waiting is lifted to the lowest waiting counter: no credit for idling.
    b = _request("b", LIGHT)
    q.push(b, 2)
    assert q.counters[2] == q.counters[1]
    assert q.peek() is a2  # equal counters: the earlier arrival
    # A base-model request (tenant 0), then an abort of a waiting request.
    base = _request("base", None)
    q.push(base, 3)
    assert q.counters[0] == q.counters[1]
    q.remove(a2)
    assert q.peek() is b and len(q) == 2


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_priority_orders_within_a_tenant(policy: str) -> None:
    sched = _scheduler(policy)
    sched.max_num_seqs = 1
    sched.add_request(_request("first", LIGHT, priority=1))
    sched.add_request(_request("urgent", LIGHT, priority=-1))
    assert [r.req_id for r in sched.schedule().new_requests] == ["urgent"]


def test_token_weights_and_an_adapters_share_scale_its_charge() -> None:
    q = FairQueue(prompt_token_weight=0.5, output_token_weight=4.0)
    double = LoRARequest("double", 3, "/adapters/double", fair_share=2.0)
    r = _request("r", double)
    q.push(r, 0)
    q.pop(r)
    r.num_computed_tokens = PROMPT_LEN
    q.charge([r], {"r": PROMPT_LEN})
    r.num_computed_tokens += 1
    q.charge([r], {"r": 1})
    assert q.counters[3] == (0.5 * PROMPT_LEN + 4.0 * 1) / 2.0


def test_overloaded_tenants_are_served_in_proportion_to_their_shares() -> None:
    """Both tenants ask for more than the engine serves; the one of share 2 gets ~twice the admissions
    (equal shares: ~equal), under the scheduler's own charging."""

    def admitted(share_a: float) -> dict[str, int]:
        a = LoRARequest("a", 1, "/adapters/a", fair_share=share_a)
        b = LoRARequest("b", 2, "/adapters/b")
        sched = _scheduler("fair")
        counts = {"a": 0, "b": 0}
        for step in range(STEPS):
            for tenant, lora in (("a", a), ("b", b)):
                for i in range(2):
                    sched.add_request(_request(f"{tenant}{step}-{i}", lora))
            out = sched.schedule()
            for new_req in out.new_requests:
                counts[new_req.req_id[0]] += 1
            scheduled = sched.scheduled_requests(out)
            sampled = {rid: [42] for rid, r in scheduled.items() if r.num_output_placeholders}
            sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
        return counts

    equal, weighted = admitted(1.0), admitted(2.0)
    assert abs(equal["a"] - equal["b"]) <= 0.05 * equal["b"], equal
    assert 1.8 <= weighted["a"] / weighted["b"] <= 2.2, weighted
    assert sum(weighted.values()) >= 0.95 * sum(equal.values())  # the same engine, only divided differently


def test_the_base_models_share_scales_its_charge_and_its_admissions() -> None:
    """fair_base_share: the base model (tenant 0) is charged service / its share, and overloaded beside
    an adapter of share 1 it is admitted in proportion."""
    q = FairQueue(base_share=4.0)
    r = _request("r", None)
    q.push(r, 0)
    q.pop(r)
    r.num_computed_tokens = PROMPT_LEN
    q.charge([r], {"r": PROMPT_LEN})
    assert q.counters[0] == PROMPT_LEN / 4.0

    a = LoRARequest("a", 1, "/adapters/a")
    sched = _scheduler("fair", base_share=2.0)
    counts = {"base": 0, "a": 0}
    for step in range(STEPS):
        for i in range(2):
            sched.add_request(_request(f"base{step}-{i}", None))
            sched.add_request(_request(f"a{step}-{i}", a))
        out = sched.schedule()
        for new_req in out.new_requests:
            counts["a" if new_req.req_id.startswith("a") else "base"] += 1
        scheduled = sched.scheduled_requests(out)
        sampled = {rid: [42] for rid, r in scheduled.items() if r.num_output_placeholders}
        sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    assert 1.8 <= counts["base"] / counts["a"] <= 2.2, counts


def test_share_must_be_positive_and_bounded() -> None:
    for bad in (0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="fair_share of adapter 'x' must be a number in"):
            LoRARequest("x", 1, "/adapters/x", fair_share=bad)  # type: ignore[arg-type]
