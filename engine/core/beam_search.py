"""Beam search's ranking, step by step, exactly as transformers' generate(num_beams=k,
num_return_sequences=k, do_sample=False, length_penalty, early_stopping) does it. Plain Python, no torch
and no numpy: a group's step handles k x 2k candidates, where a numpy call per stage costs more than the
loop. The engine ranks stage 1 for all the groups that step together with numpy instead
(engine/core/beam_ranking.py), then runs `advance` per group. Every score is rounded to float32 after each operation (array("f")), the dtype transformers
accumulates in, so the same candidates win: a float64 result of one +, - or / of float32 values,
rounded to float32, is the correctly rounded float32 result.

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

from array import array
from collections.abc import Callable
from dataclasses import dataclass

_NEG = -1.0e9  # transformers' "impossible" score offset (exact in float32)


def _f32(x: float) -> float:
    return array("f", (x,))[0]


@dataclass(slots=True)
class Hypothesis:
    """A finished beam: its generated tokens (the stop token included when one ended it)."""

    token_ids: list[int]
    cum_logprob: float  # sum of the tokens' log-probabilities
    score: float  # cum_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" or "length"
    stop_str: str | None = None  # the stop string it completed, if one ended it


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
        stop_string: Callable[[list[int]], str | None] | None = None,
    ) -> None:
        """`stop_string(tokens)`: the stop string that the last of a candidate's generated `tokens`
        completes, or None (a stopping criterion like a stop token's; None: no stop strings)."""
        self.width = width
        self.stop_string = stop_string
        self.stop_token_ids = stop_token_ids
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        # Candidates kept per step, and so the top-N log-probabilities each beam needs from the runner.
        self.num_candidates = max(2, 1 + len(stop_token_ids)) * width
        # Running beams, best first: their float32 scores and generated tokens, each as a chain
        # (last token, the chain before it), so a step costs O(k) however long the beams are. The first
        # step has the prompt alone (transformers' other k - 1 copies start at -1e9 and never place).
        self.scores: list[float] = [0.0]
        self._chains: list[tuple | None] = [None]
        # k finished slots, best first, as transformers keeps them: unfilled ones score -1e9.
        self.finished_scores: list[float] = [_NEG] * width
        self.finished: list[Hypothesis | None] = [None] * width
        self.num_generated = 0
        self.improvable = True
        self.done = False

    def restarted(self) -> BeamSearchState:
        """The same search from its first step (a preempted device-ranked group computes it again)."""
        return BeamSearchState(
            self.width,
            self.stop_token_ids,
            self.max_tokens,
            self.length_penalty,
            self.early_stopping,
            self.stop_string,
        )

    @property
    def num_running(self) -> int:
        return len(self.scores)

    @property
    def outputs(self) -> list[list[int]]:
        """The running beams' generated tokens."""
        return [_tokens(c) for c in self._chains]

    def step(self, top: list[tuple[list[int], list[float]]]) -> BeamStep:
        """top[i]: running beam i's most likely next tokens and their log-probabilities, best first
        (at least num_candidates of them). Returns the next running beams."""
        # Every candidate as (-score, beam, token): sorted, the best first, ties by the lower
        # beam-major index (what a top-k over beam x vocabulary gives).
        cands: list[tuple[float, int, int]] = []
        for i, (ids, lps) in enumerate(top):
            score = self.scores[i]
            accs = array("f", [score + lp for lp in lps])
            cands += [(-a, i, t) for a, t in zip(accs, ids, strict=True)]
        cands.sort()
        del cands[self.num_candidates :]
        return self.advance(cands)

    def advance(self, cands: list[tuple[float, int, int]]) -> BeamStep:
        """The step from its ranked candidates: the best num_candidates of every running beam's
        (-float32 score, beam, token), sorted (step() builds them; engine/core/beam_ranking.py builds
        them for many groups at once)."""
        stop_ids = self.stop_token_ids
        gen_len = self.num_generated + 1
        at_max = gen_len >= self.max_tokens
        hits = [at_max or t in stop_ids for _, _, t in cands]
        chains = self._chains
        stop_strs: list[str | None] = [None] * len(cands)
        if self.stop_string is not None:
            for j, (_, beam, tok) in enumerate(cands):
                if not hits[j]:
                    stop_strs[j] = self.stop_string(_tokens((tok, chains[beam])))
                    hits[j] = stop_strs[j] is not None

        if any(hits):
            continuations = self._rank_with_hits(cands, hits, stop_strs, gen_len)
        else:
            continuations = self._rank_without_hits(cands)
        return self._end_step(continuations, all(hits))

    def can_advance_plainly(self, tokens: list[int]) -> bool:
        """Whether a step whose ranked candidates end in `tokens` has no candidate that hits a
        stopping criterion (then advance_plainly may take it)."""
        if self.stop_string is not None or self.num_generated + 1 >= self.max_tokens:
            return False
        stop_ids = self.stop_token_ids
        return not any(t in stop_ids for t in tokens)

    def advance_plainly(self, scores: list[float], continuations: list[tuple[int, int]]) -> BeamStep:
        """advance() for a step that can_advance_plainly: the best k candidates' float32 scores and
        (beam, token), best first, run on; the finished slots stay (see _rank_without_hits)."""
        self.scores = scores
        return self._end_step(continuations, False)

    def _end_step(self, continuations: list[tuple[int, int]], all_hit: bool) -> BeamStep:
        chains = self._chains
        self._chains = [(t, chains[b]) for b, t in continuations]
        gen_len = self.num_generated = self.num_generated + 1

        # Can a running beam still beat the worst finished one?
        lp = self.length_penalty
        if self.early_stopping == "never" and lp > 0.0:
            best_len = self.max_tokens
        else:
            best_len = gen_len
        best_possible = _f32(self.scores[0] / _f32(best_len**lp))
        # An empty slot can always be filled. transformers compares with its -1e9 instead, the same
        # wherever scores stay above -1e9; a negative length_penalty multiplies them past it
        # (-20 * 8**12), and the search then stopped with fewer than k results.
        self.improvable = self.improvable and (
            any(h is None for h in self.finished) or best_possible > min(self.finished_scores)
        )
        all_finished = all(h is not None for h in self.finished)
        self.done = not (
            self.improvable and not (all_finished and self.early_stopping is True) and not all_hit
        )
        return BeamStep(continuations, self.done)

    def _rank_without_hits(self, cands: list[tuple[float, int, int]]) -> list[tuple[int, int]]:
        """The common step, where no candidate hit a stopping criterion: what _rank_with_hits gives
        then, without its sorts. The best k candidates run on, in their order (its sort keeps equal
        scores in candidate order), and the finished slots stay as they are (a candidate that did not
        hit scores -1e9 plus its own score there, at or below every slot, and a tie keeps the slot)."""
        keep = cands[: self.width]
        self.scores = [-c[0] for c in keep]
        return [(beam, tok) for _, beam, tok in keep]

    def _rank_with_hits(
        self,
        cands: list[tuple[float, int, int]],
        hits: list[bool],
        stop_strs: list[str | None],
        gen_len: int,
    ) -> list[tuple[int, int]]:
        """A step where some candidates hit a stopping criterion: the next running beams (their
        scores into self.scores) and the finished slots updated with the hits among the first k."""
        k = self.width
        stop_ids = self.stop_token_ids
        chains = self._chains
        # Next running beams: the best k candidates that did not hit a stopping criterion.
        running_lp = array("f", [-c[0] + _NEG if h else -c[0] for c, h in zip(cands, hits, strict=True)])
        keep = sorted(range(len(cands)), key=lambda j: -running_lp[j])[:k]
        continuations = [(cands[j][1], cands[j][2]) for j in keep]

        # Finished hypotheses: those of the first k candidates that hit one, length-penalized.
        lp = self.length_penalty
        denom = _f32(gen_len**lp)
        full = all(h is not None for h in self.finished) and self.early_stopping is True
        penalized = array("f", [-c[0] / denom for c in cands])
        fins = penalized
        if full:  # no new hypothesis may enter (the search stops at this step anyway)
            fins = array("f", [f + _NEG for f in fins])
        if not self.improvable:
            fins = array("f", [f + _NEG for f in fins])
        not_finished = array("f", [f + _NEG for f in fins])
        merged_scores = list(self.finished_scores)
        merged: list[Hypothesis | None] = list(self.finished)
        # Whether each entry is a hypothesis that may hold a slot: these rank above every other entry
        # (empty slots, candidates that did not hit, hypotheses barred from entering). transformers
        # ranks by the -1e9 offsets alone, which agrees wherever scores stay above -1e9 (see _end_step).
        holds = [h is not None for h in merged]
        may_enter = not full and self.improvable
        for j, (neg_acc, beam, tok) in enumerate(cands):
            if not (hits[j] and j < k):
                merged_scores.append(not_finished[j])
                merged.append(None)
                holds.append(False)
                continue
            merged_scores.append(fins[j])
            holds.append(may_enter)
            merged.append(
                Hypothesis(
                    _tokens((tok, chains[beam])),
                    -neg_acc,
                    penalized[j],
                    "stop" if tok in stop_ids or stop_strs[j] is not None else "length",
                    stop_strs[j],
                )
            )
        best = sorted(range(len(merged_scores)), key=lambda j: (not holds[j], -merged_scores[j]))[:k]
        self.finished_scores = [merged_scores[j] for j in best]
        self.finished = [merged[j] for j in best]
        self.scores = [running_lp[j] for j in keep]
        return continuations

    def results(self) -> list[Hypothesis]:
        """The finished hypotheses, best first (k of them once done)."""
        return [h for h in self.finished if h is not None]


def _tokens(chain: tuple | None) -> list[int]:
    out: list[int] = []
    while chain is not None:
        out.append(chain[0])
        chain = chain[1]
    out.reverse()
    return out
