"""Beam search's batched ranking (engine/core/beam_ranking.py) steps every group exactly as its own
BeamSearchState.step does, whatever the mix of widths, first steps, ties and finished hypotheses."""

from __future__ import annotations

import copy
import random

import numpy as np

from engine.core.beam_ranking import rank_groups
from engine.core.beam_search import BeamSearchState


def _state(rng: random.Random) -> BeamSearchState:
    width = rng.choice([1, 2, 4])
    stops = frozenset(rng.sample([2, 3], rng.choice([1, 2])))  # 1 or 2 stop ids: 2k or 3k candidates
    return BeamSearchState(
        width, stops, rng.randrange(3, 12), rng.choice([1.0, 0.5, -0.5]), rng.choice([False, True, "never"])
    )


def test_groups_ranked_together_step_as_each_alone() -> None:
    rng = random.Random(11)
    alone = [_state(rng) for _ in range(24)]
    together = copy.deepcopy(alone)
    num_top = max(s.num_candidates for s in alone) + 2  # wider than any group asks: extra columns
    # Log-probabilities from a small pool (equal candidate scores are common) of float32 values with
    # full mantissas (a score + log p needs rounding to float32, as the runner's values do).
    pool = [float(np.float32(-rng.uniform(0.05, 6.0))) for _ in range(10)]
    checked_hits = checked_plain = 0
    for _ in range(14):
        live = [g for g, s in enumerate(alone) if not s.done]
        if not live:
            break
        # One row per running beam of every live group; stop ids land at any rank.
        rows: list[list[int]] = []
        ids, lps = [], []
        for g in live:
            group_rows = []
            for _ in range(alone[g].num_running):
                row_ids = rng.sample(range(4, 60), num_top)
                if rng.random() < 0.25:
                    row_ids[rng.randrange(num_top)] = rng.choice([2, 3])
                ids.append(row_ids)
                lps.append(sorted((rng.choice(pool) for _ in row_ids), reverse=True))
                group_rows.append(len(ids) - 1)
            rows.append(group_rows)
        order = list(range(len(ids)))
        rng.shuffle(order)  # rows of a step come in any order
        where = {old: new for new, old in enumerate(order)}
        token_ids = np.array([ids[i] for i in order], dtype=np.int64)
        logprobs = np.array([lps[i] for i in order], dtype=np.float64)
        expected = []
        for g, group_rows in zip(live, rows, strict=True):
            k = alone[g].num_candidates
            expected.append(alone[g].step([(ids[r][:k], lps[r][:k]) for r in group_rows]))
        got = rank_groups(
            [together[g] for g in live],
            [[where[r] for r in group_rows] for group_rows in rows],
            [together[g].num_candidates for g in live],
            token_ids,
            logprobs,
        )
        assert got == expected
        for g in live:
            a, b = alone[g], together[g]
            assert (b.scores, b.finished_scores, b.finished, b.outputs, b.done) == (
                a.scores,
                a.finished_scores,
                a.finished,
                a.outputs,
                a.done,
            )
            if any(h is not None for h in a.finished):
                checked_hits += 1
            else:
                checked_plain += 1
    assert all(s.done for s in alone)
    assert checked_hits > 20 and checked_plain > 20


def test_scores_below_minus_1e9_still_fill_every_slot() -> None:
    """A negative length_penalty pushes finished scores below transformers' -1e9 'empty slot' score
    (here -3 * 4**20 ~ -3.3e12): every slot still fills, best first, and the search runs until then."""
    state = BeamSearchState(2, frozenset({2}), 4, -20.0, False)
    top = [([5, 6, 2, 7], [-1.0, -1.5, -2.0, -3.0])]
    for _ in range(4):
        if state.done:
            break
        state.step(top * state.num_running)
    results = state.results()
    assert state.done and len(results) == 2
    assert results[0].score >= results[1].score and results[1].score < -1.0e9
