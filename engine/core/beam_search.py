"""Beam search's ranking, step by step, exactly as transformers' generate(num_beams=k,
num_return_sequences=k, do_sample=False, length_penalty, early_stopping) does it. No torch: the scores
are numpy float32, the dtype transformers accumulates them in, so the same candidates win.

One step of a group of k running beams (at the first step, the prompt alone):
  1. every beam's top candidates (the runner gives each beam's top-K raw log-probabilities) are
     scored `beam score + log p`, and the top K = max(2, 1 + number of stop tokens) x k over the group
     are kept, best first (ties: lower beam, then lower token id, as a top-k over beam-major indices);
  2. a candidate ending in a stop token, or reaching max_tokens, "hits" a stopping criterion: the k
     best candidates that do not are the next running beams;
  3. candidates among the first k that hit go to the finished hypotheses, scored
     `sum of log p / (generated length ** length_penalty)`; the k best finished are kept;
  4. the search stops when no running beam can beat the worst of k finished hypotheses (estimated
     with the current length, or with max_tokens when early_stopping == "never" and the length
     penalty is positive), when k are finished and early_stopping is True, or when every candidate
     hit a stopping criterion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_NEG = np.float32(-1.0e9)  # transformers' "impossible" score offset


@dataclass(slots=True)
class Hypothesis:
    """A finished beam: its generated tokens (the stop token included when one ended it)."""

    token_ids: list[int]
    cum_logprob: float  # sum of the tokens' log-probabilities
    score: float  # cum_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" or "length"


@dataclass(slots=True)
class BeamStep:
    """What one step decided: the new running beams, best first, as (parent beam, token id)."""

    continuations: list[tuple[int, int]]
    done: bool


class BeamSearchState:
    """The ranking state of one request's beam search (engine/beam_search.py drives it)."""

    def __init__(
        self,
        width: int,
        stop_token_ids: frozenset[int],
        max_tokens: int,
        length_penalty: float,
        early_stopping: bool | str,
    ) -> None:
        self.width = width
        self.stop_token_ids = stop_token_ids
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        # Candidates kept per step, and so the top-N log-probabilities each beam needs from the runner.
        self.num_candidates = max(2, 1 + len(stop_token_ids)) * width
        # Running beams, best first: their scores and generated tokens. The first step has the prompt
        # alone (transformers' other k - 1 copies start at -1e9 and never place).
        self.scores = np.zeros(1, dtype=np.float32)
        self.outputs: list[list[int]] = [[]]
        # k finished slots, best first, as transformers keeps them: unfilled ones score -1e9.
        self.finished_scores = np.full(width, _NEG, dtype=np.float32)
        self.finished: list[Hypothesis | None] = [None] * width
        self.num_generated = 0
        self.improvable = True
        self.done = False

    @property
    def num_running(self) -> int:
        return len(self.outputs)

    def step(self, top: list[tuple[list[int], list[float]]]) -> BeamStep:
        """top[i]: running beam i's most likely next tokens and their log-probabilities, best first
        (at least num_candidates of them). Returns the next running beams."""
        k = self.width
        n_cand = self.num_candidates
        beams = np.concatenate([np.full(len(ids), i, dtype=np.int64) for i, (ids, _) in enumerate(top)])
        tokens = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in top])
        acc = np.concatenate(
            [self.scores[i] + np.asarray(lps, dtype=np.float32) for i, (_, lps) in enumerate(top)]
        )  # [beams x N] float32
        order = np.lexsort((tokens, beams, -acc))[:n_cand]  # score desc, then beam-major index
        beams, tokens, acc = beams[order], tokens[order], acc[order]
        gen_len = self.num_generated + 1
        stop_ids = self.stop_token_ids
        hits = np.fromiter(
            (int(t) in stop_ids or gen_len >= self.max_tokens for t in tokens), dtype=bool, count=len(tokens)
        )

        # Next running beams: the best k candidates that did not hit a stopping criterion.
        running_lp = acc + _NEG * hits.astype(np.float32)
        keep = np.argsort(-running_lp, kind="stable")[:k]
        old_outputs = self.outputs
        continuations = [(int(beams[j]), int(tokens[j])) for j in keep]

        # Finished hypotheses: those of the first k candidates that hit one, length-penalized.
        lp = self.length_penalty
        penalized = acc / np.float32(gen_len**lp)
        full = bool(all(h is not None for h in self.finished)) and self.early_stopping is True
        just_finished = hits & (np.arange(len(tokens)) < k)
        fin = penalized + _NEG * np.float32(full) + _NEG * np.float32(not self.improvable)
        fin = fin + _NEG * (~just_finished).astype(np.float32)
        merged_scores = np.concatenate([self.finished_scores, fin])
        merged: list[Hypothesis | None] = list(self.finished)
        for j in range(len(tokens)):
            if just_finished[j]:
                tok = int(tokens[j])
                merged.append(
                    Hypothesis(
                        old_outputs[int(beams[j])] + [tok],
                        float(acc[j]),
                        float(penalized[j]),
                        "stop" if tok in stop_ids else "length",
                    )
                )
            else:
                merged.append(None)
        best = np.argsort(-merged_scores, kind="stable")[:k]
        self.finished_scores = merged_scores[best]
        self.finished = [merged[j] for j in best]

        self.scores = running_lp[keep]
        self.outputs = [old_outputs[b] + [t] for b, t in continuations]
        self.num_generated = gen_len

        # Can a running beam still beat the worst finished one?
        if self.early_stopping == "never" and lp > 0.0:
            best_len = self.max_tokens
        else:
            best_len = gen_len
        best_possible = self.scores[0] / np.float32(best_len**lp)
        worst = self.finished_scores.min()
        self.improvable = self.improvable and any(
            best_possible > (worst if h is not None else _NEG) for h in self.finished
        )
        all_finished = all(h is not None for h in self.finished)
        self.done = not (
            self.improvable and not (all_finished and self.early_stopping is True) and not hits.all()
        )
        return BeamStep(continuations, self.done)

    def results(self) -> list[Hypothesis]:
        """The finished hypotheses, best first (k of them once done)."""
        return [h for h in self.finished if h is not None]
