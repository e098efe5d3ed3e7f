"""Beam search's per-step host work: what the engine does on the host between a beam step's results
and the next launch is the ranking and the forks, not work for outputs no one reads."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest

from engine import LLM, BeamSearchParams, SamplingParams
from engine.core.beam_search import BeamSearchState

PROMPT = [1, 50, 60, 70, 80, 90, 100]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=8)


def test_beam_candidates_are_not_detokenized_while_shown_logprobs_are(llm: LLM) -> None:
    """A beam's top candidates come back as logprobs for the ranking only: decoding their texts each
    step (a tokenizer call per new id) was most of a beam step's host time. A request that shows its
    logprobs, run beside the beams, still gets every token's text."""
    engine = llm.llm_engine
    texts = engine.output_processor.token_texts.texts
    texts.clear()
    engine.add_request("beams", PROMPT, BeamSearchParams(4, 8, ignore_eos=True).to_sampling_params())
    engine.add_request(
        "shown", PROMPT[::-1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    )
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    shown = finals["shown"].outputs[0].logprobs
    assert shown is not None and len(shown) == 8
    shown_ids = {token_id for position in shown for token_id in position}
    tok = llm.get_tokenizer()
    assert all(lp.decoded_token == tok.decode([t]) for position in shown for t, lp in position.items())
    # Exactly the shown request's ids were decoded, none of the beams' 8 x 8 candidates per step.
    assert set(texts) == shown_ids
    assert len(finals["beams"].outputs) == 4


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_a_step_without_hits_ranks_as_the_full_ranking(early_stopping: bool | str) -> None:
    """The ranking's common step (no candidate ends a hypothesis) skips the finished-slot sorts; on
    states with some slots filled, ties between candidates included, it picks what they pick."""
    rng = random.Random(7)
    eos = 2
    state = BeamSearchState(4, frozenset({eos}), 40, 1.0, early_stopping)
    checked = 0
    for _ in range(30):
        # Coarse log-probabilities (multiples of 1/4): equal candidate scores happen often.
        top = []
        for _ in range(state.num_running):
            ids = rng.sample(range(3, 40), 8)
            if rng.random() < 0.3:
                ids[rng.randrange(8)] = eos  # at any rank
            lps = sorted((-rng.randrange(1, 16) / 4 for _ in ids), reverse=True)
            top.append((ids, lps))
        cands = sorted(
            (-(state.scores[i] + lp), i, t)
            for i, (ids, lps) in enumerate(top)
            for t, lp in zip(ids, lps, strict=True)
        )
        cands = cands[: state.num_candidates]
        if not any(t == eos for _, _, t in cands):
            fast, full = copy.deepcopy(state), copy.deepcopy(state)
            n = len(cands)
            assert fast._rank_without_hits(cands) == full._rank_with_hits(cands, [False] * n, [None] * n, 1)
            assert (fast.scores, fast.finished_scores, fast.finished) == (
                full.scores,
                full.finished_scores,
                full.finished,
            )
            checked += 1
        state.step(top)
        if state.done:
            break
    assert checked >= 5 and any(h is not None for h in state.finished)


def _run_two_groups(llm: LLM, steps_apart: int) -> tuple[int, int, dict]:
    """Two beam searches of width 4, 8 tokens each, the second added `steps_apart` engine steps
    after the first; returns (forward passes launched, stalls, final outputs)."""
    engine = llm.llm_engine
    params = BeamSearchParams(4, 8, ignore_eos=True).to_sampling_params()
    steps0, stalls0 = engine.step_times.steps, engine.pipeline.num_stalls
    finals = {}
    engine.add_request("first", PROMPT, params)
    for _ in range(steps_apart):
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    engine.add_request("second", PROMPT[::-1], params)
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    return engine.step_times.steps - steps0, engine.pipeline.num_stalls - stalls0, finals


def test_beam_groups_in_alternate_steps_keep_the_device_busy(tiny_llama_dir: Path) -> None:
    """Ranked on the host, a beam group's next step needs its last step's candidates, so a group
    alone stalls the pipeline once per token. Two groups admitted together move in the same steps
    and stall together (8 steps of 8 beams, each followed by a trip that only waits); admitted one
    step apart they take turns: one group's step runs on the device while the other's results are
    ranked, and the only stall is the last group's last step."""
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=8, beam_device_ranking=False)
    steps, stalls, together = _run_two_groups(llm, 0)
    assert (steps, stalls) == (8, 8)
    steps, stalls, apart = _run_two_groups(llm, 1)
    assert (steps, stalls) == (16, 1)
    for rid in ("first", "second"):
        assert [c.token_ids for c in apart[rid].outputs] == [c.token_ids for c in together[rid].outputs]
    llm.shutdown()


def test_device_ranked_groups_share_every_step(llm: LLM) -> None:
    """Ranked on the device after their first step, groups do not wait for the host: two groups
    admitted together take 8 steps (one per token, all 8 beams in each); the host's first ranking
    and the last trip stall. Admitted a step apart, the second group's prompt joins the first
    group's device steps: the first group's 7 device steps run from step 3, the second's from step 4,
    10 steps in all, and the only stall is the last trip."""
    steps, stalls, together = _run_two_groups(llm, 0)
    assert (steps, stalls) == (8, 2)
    steps, stalls, apart = _run_two_groups(llm, 1)
    assert (steps, stalls) == (10, 1)
    for rid in ("first", "second"):
        assert [c.token_ids for c in apart[rid].outputs] == [c.token_ids for c in together[rid].outputs]
    for rid in ("first", "second"):
        assert [c.token_ids for c in apart[rid].outputs] == [c.token_ids for c in together[rid].outputs]
