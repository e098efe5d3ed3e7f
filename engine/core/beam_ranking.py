"""Beam search's candidate ranking for many groups at once: the first stage of
BeamSearchState.step (score every running beam's candidates, keep the best num_candidates per group,
best first) as a few numpy calls over every group that steps in one engine update, instead of a
Python loop and sort per group. The rest of each group's step (stopping criteria, finished
hypotheses, the early-stopping rule) is BeamSearchState.advance, unchanged.

Exactness: a candidate's score is the float32 rounding of (beam score + log p), computed in float64
and then rounded once, which is what step() does with array("f"); the order is (-score, beam, token),
the order of step()'s sort of the same tuples (ties: the lower beam, then the lower token id).
"""

from __future__ import annotations

import numpy as np

from engine.core.beam_search import BeamSearchState, BeamStep


def rank_groups(
    states: list[BeamSearchState],
    rows: list[list[int]],
    num_top: list[int],
    token_ids: np.ndarray,  # [R, W] int64: row r's most likely next tokens, best first
    logprobs: np.ndarray,  # [R, W] float64 (float32 values): their log-probabilities
) -> list[BeamStep]:
    """Step every group g: `rows[g][i]` is the row of its running beam i, of which it ranks the first
    `num_top[g]` columns (every beam of a group asks for the same number). Returns the groups' steps,
    in order."""
    steps: list[BeamStep | None] = [None] * len(states)
    # Groups of one shape (running beams, columns used, candidates kept) rank together.
    buckets: dict[tuple[int, int, int], list[int]] = {}
    for g, state in enumerate(states):
        key = (len(rows[g]), num_top[g], state.num_candidates)
        buckets.setdefault(key, []).append(g)
    for (num_running, k, n), members in buckets.items():
        index = np.array([rows[g] for g in members], dtype=np.int64)  # [G, r]
        scores = np.array([states[g].scores for g in members], dtype=np.float64)  # [G, r]
        size = num_running * k
        lps = logprobs[index, :k]  # [G, r, k]
        acc = (scores[:, :, None] + lps).astype(np.float32).reshape(len(members), size)  # [G, r*k]
        tok = token_ids[index, :k].reshape(len(members), size)  # [G, r*k]
        beam = np.broadcast_to(np.arange(num_running).repeat(k), tok.shape)  # [G, r*k]
        order = np.lexsort((tok, beam, -acc), axis=-1)[:, :n]  # [G, min(n, r*k)] best first
        best = np.take_along_axis(acc, order, axis=-1).tolist()
        beams = (order // k).tolist()
        toks = np.take_along_axis(tok, order, axis=-1).tolist()
        for j, g in enumerate(members):
            state = states[g]
            if state.can_advance_plainly(toks[j]):  # the common step: no candidate ends a hypothesis
                width = state.width
                steps[g] = state.advance_plainly(
                    best[j][:width], list(zip(beams[j][:width], toks[j][:width], strict=True))
                )
            else:
                cands = [(-a, b, t) for a, b, t in zip(best[j], beams[j], toks[j], strict=True)]
                steps[g] = state.advance(cands)
    return steps  # type: ignore[return-value]
