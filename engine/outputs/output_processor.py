"""The output processor: a step's token updates in, the requests' RequestOutputs out.

It holds the output side of every unfinished request: per sequence (one of a request's n) its
detokenizer, its token ids and logprobs so far, and what it has not handed out yet. What an output
carries depends on the request's `output_kind`:

- "delta": every step's output carries only what that step added (`text_delta`, `token_ids_delta`,
  `logprobs_delta`); the whole sequence (`text`, `token_ids`, `logprobs`) is assembled once, on the
  finished output. A stream's cost per step is the size of the step, not of its history.
- "cumulative": the same deltas, plus the sequence so far on every output: token ids and logprobs
  as snapshots that stay O(1) per step however long the sequence (engine/outputs/prefix_view.py).
- "final_only": one output, when the request finishes; its deltas hold everything.

Logprob token strings (of the sequences that show logprobs) are decoded in one batched call per step
(engine/outputs/token_texts.py).
A stop string found by the detokenizer is reported back to the caller (the engine), which tells the
scheduler; nothing here writes to the scheduler's requests.

Hot path: `process` runs for every running request every step, on the event loop; it sticks to plain
lookups and positional constructors on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.core.request import Request, RequestStatus
from engine.core.scheduler_output import SchedulerOutput, TokenLogprobs
from engine.inputs.input_processor import EngineRequest
from engine.outputs.detokenizer import IncrementalDetokenizer
from engine.outputs.prefix_view import PrefixView
from engine.outputs.request_output import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from engine.outputs.token_texts import TokenTexts

# output_kind, as small ints compared on the hot path.
_DELTA, _CUMULATIVE, _FINAL_ONLY = 0, 1, 2
_KINDS = {"delta": _DELTA, "cumulative": _CUMULATIVE, "final_only": _FINAL_ONLY}
# From this length on, a cumulative output views its sequence instead of copying it (measured: a
# copy of 128 ids costs about what building the view does).
_VIEW_MIN_LEN = 128


@dataclass(slots=True, eq=False)
class _Sequence:
    """One of the n sequences of a request: its scheduler Request plus output-side state."""

    index: int
    request: Request  # the scheduler's: results are matched to it by identity
    detokenizer: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] | None  # append-only (cumulative outputs hold views of it)
    cumulative_logprob: float | None
    parent: _RequestState = field(init=False)
    token_ids: list[int] = field(default_factory=list)  # append-only, like logprobs
    num_sent_tokens: int = 0  # token_ids[:num_sent_tokens] went out in earlier outputs
    num_sent_logprobs: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it


@dataclass(slots=True, eq=False)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: int
    sequences: list[_Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = None
    every_step: bool = True  # an output after every step that adds tokens (not final_only)
    cumulative: bool = True  # ... and each carries the whole sequence so far
    # Sequences returned: fewer than `sequences` with best_of > n, whose one output (at finish) keeps
    # the n with the highest cumulative logprob.
    num_returned: int = 0

    def __post_init__(self) -> None:
        if not self.num_returned:
            self.num_returned = len(self.sequences)
        # best_of > n has nothing to stream: which sequences are returned is known only at the end.
        self.every_step = self.kind != _FINAL_ONLY and self.num_returned == len(self.sequences)
        self.cumulative = self.kind == _CUMULATIVE
        for s in self.sequences:
            s.parent = self

    @property
    def finished(self) -> bool:
        for s in self.sequences:
            if s.finish_reason is None:
                return False
        return True


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self._requests: dict[str, _RequestState] = {}
        self._sequences: dict[str, _Sequence] = {}  # by the scheduler's req_id
        self.num_generation_tokens = 0

    # ------------------------------------------------------------------ requests
    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def has_sequence(self, req_id: str) -> bool:
        return req_id in self._sequences

    def add_request(self, request: EngineRequest, sequences: list[Request]) -> None:
        """Track a request whose n sequences are the scheduler Requests `sequences`, in index order."""
        params = request.sampling_params
        want_logprobs = params.logprobs is not None
        # best_of > n ranks its sequences by cumulative logprob, asked for or not (the sampler gives
        # every child its chosen token's logprob: SamplingParams.clone_for_child).
        ranked = params.n < len(sequences)
        # No output before the end (final_only, or best_of > n): the text is decoded once, at the end,
        # unless a stop string must be searched for as it grows (the detokenizer decides that).
        deferred = _KINDS[params.output_kind] == _FINAL_ONLY or ranked
        states = [
            _Sequence(
                index=i,
                request=req,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer, request.prompt_token_ids, req.sampling_params, deferred
                ),
                logprobs=[] if want_logprobs else None,
                cumulative_logprob=0.0 if want_logprobs or ranked else None,
            )
            for i, req in enumerate(sequences)
        ]
        state = _RequestState(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            kind=_KINDS[params.output_kind],
            sequences=states,
            metrics=RequestMetrics(arrival_time=request.arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            num_returned=params.n,
        )
        self._requests[request.request_id] = state
        for s in states:
            self._sequences[s.request.req_id] = s

    def abort(self, request_id: str) -> list[str] | None:
        """Forget a request without an output; returns its sequences' req_ids (None if unknown)."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        ids = [s.request.req_id for s in state.sequences]
        for req_id in ids:
            self._sequences.pop(req_id, None)
        return ids

    # ------------------------------------------------------------------ a step's results
    def add_prompt_logprobs(
        self,
        scheduler_output: SchedulerOutput,
        prompt_logprobs: Mapping[str, list[TokenLogprobs]],
        scheduled: Mapping[str, Request],
    ) -> None:
        """Collect the prompt logprobs a step computed. `scheduled`: the Request each id of the step
        was scheduled for (a reused id's results must not reach the new request)."""
        starts = {c.req_id: c.num_computed_tokens for c in scheduler_output.cached_requests}
        starts.update((r.req_id, r.num_computed_tokens) for r in scheduler_output.new_requests)
        self.token_texts.add(_ids_of(lp for entries in prompt_logprobs.values() for lp in entries))
        for req_id, entries in prompt_logprobs.items():
            seq = self._sequences.get(req_id)
            if seq is None or seq.index != 0 or seq.request is not scheduled.get(req_id):
                continue
            collected = seq.parent.prompt_logprobs
            assert collected is not None
            # Entry k scores prompt position start + 1 + k. After a preemption mid-prefill the runner
            # recomputes positions it already reported; keep only positions not yet collected.
            start = starts[req_id]
            for k, entry in enumerate(entries):
                if start + 1 + k == len(collected):
                    collected.append(self._position_logprobs(entry))

    def process(
        self, updates: Iterable[tuple[Request, list[int]]], logprobs: Mapping[str, TokenLogprobs], now: float
    ) -> tuple[list[RequestOutput], list[str]]:
        """Apply the scheduler's (request, tokens appended this step) updates. Returns the outputs of
        the requests that have one this step, and the req_ids a stop string ended (for the caller to
        finish in the scheduler)."""
        sequences = self._sequences
        if logprobs:
            # Only the texts that an output shows: beams' candidates (engine/beam_search.py ranks
            # them) and best_of children without logprobs asked for carry logprobs no one reads.
            shown = [
                lp
                for req_id, lp in logprobs.items()
                if (seq := sequences.get(req_id)) is not None and seq.logprobs is not None
            ]
            if shown:
                self.token_texts.add(_ids_of(shown))
        touched: dict[str, _RequestState] = {}
        stopped_ids: list[str] = []
        stopped = RequestStatus.FINISHED_STOPPED
        num_generated = 0
        for request, new_token_ids in updates:
            seq = sequences.get(request.req_id)
            if seq is None or seq.request is not request:
                continue
            parent = seq.parent
            metrics = parent.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                metrics.first_scheduled_time = request.first_scheduled_time
            num_generated += len(new_token_ids)
            seq.token_ids += new_token_ids
            if logprobs:
                # Present for rows that asked: logprobs requested, or a best_of > n child.
                lp = logprobs.get(request.req_id)
                if lp is not None:
                    if seq.logprobs is not None:
                        seq.logprobs.append(self._position_logprobs(lp))
                    seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + lp.chosen_logprob
            # A stop token's own text is left out of the output, as vLLM does (EOS is special anyway).
            status = request.status
            detokenizer = seq.detokenizer
            stop_str = detokenizer.update(new_token_ids, status == stopped)  # (ids, stop_terminated)
            if stop_str is not None and status < stopped:
                seq.stop_reason = stop_str
                stopped_ids.append(request.req_id)
                status = stopped
            if status >= stopped:
                seq.finish_reason = status.finish_reason
                if seq.stop_reason is None:
                    seq.stop_reason = request.stop_reason  # the stop token id, if one ended it
                detokenizer.finish()
            if parent.every_step or parent.finished:
                touched[parent.request_id] = parent
        self.num_generation_tokens += num_generated
        make = self._make_output
        return [make(p, now) for p in touched.values()], stopped_ids

    def fail(self, req_ids: Iterable[str], message: str, now: float) -> tuple[list[RequestOutput], list[str]]:
        """The forward pass that computed `req_ids` failed: their requests end with finish_reason
        "error". Returns the final outputs and every sequence's req_id, to finish in the scheduler."""
        failed: dict[str, _RequestState] = {}
        for req_id in req_ids:
            seq = self._sequences.get(req_id)
            if seq is not None:
                failed[seq.parent.request_id] = seq.parent
        for state in failed.values():
            state.error = message
        return self._end(failed.values(), "error", now)

    def end(self, request_id: str, reason: str, now: float) -> tuple[RequestOutput | None, list[str]]:
        """End one request with `reason` (AsyncEngine.abort): its final output (None if unknown) and
        its sequences' req_ids, to finish in the scheduler."""
        state = self._requests.get(request_id)
        if state is None:
            return None, []
        outputs, req_ids = self._end([state], reason, now)
        return outputs[0], req_ids

    def abort_all(self, now: float) -> tuple[list[RequestOutput], list[str]]:
        """End every request with finish_reason "abort" (server shutdown); returns the final outputs
        and every sequence's req_id, to finish in the scheduler."""
        return self._end(list(self._requests.values()), "abort", now)

    # ------------------------------------------------------------------ outputs
    def _end(
        self, states: Iterable[_RequestState], reason: str, now: float
    ) -> tuple[list[RequestOutput], list[str]]:
        outputs, req_ids = [], []
        for state in states:
            for s in state.sequences:
                req_ids.append(s.request.req_id)
                if s.finish_reason is None:
                    s.finish_reason = reason
                    s.detokenizer.finish()
            outputs.append(self._make_output(state, now))
        return outputs, req_ids

    def _make_output(self, state: _RequestState, now: float) -> RequestOutput:
        finished = state.finished
        cumulative = state.cumulative
        completions = []
        returned = state.sequences
        if finished and state.num_returned < len(returned):
            # best_of: the n highest cumulative logprobs, best first (ties: the lower index),
            # re-indexed 0..n-1 as the caller's choices are.
            returned = sorted(returned, key=_rank_key)[: state.num_returned]
            for i, s in enumerate(returned):
                s.index = i
        for s in returned:
            token_ids = s.token_ids
            n = len(token_ids)
            delta_ids = token_ids[s.num_sent_tokens :]
            s.num_sent_tokens = n
            detokenizer = s.detokenizer
            if s.finish_reason is not None:
                # The whole sequence, assembled once: this state is dropped with its last output, so
                # its lists are handed over rather than copied.
                text, all_ids = detokenizer.output_text, token_ids
            elif cumulative:
                # A snapshot: a copy while short (cheaper than building a view), then a view.
                text = detokenizer.output_text
                all_ids = token_ids[:] if n < _VIEW_MIN_LEN else PrefixView(token_ids, n)
            else:
                text, all_ids = "", []
            logprobs = s.logprobs
            if logprobs is None:
                all_logprobs = delta_logprobs = None
            else:
                all_logprobs, delta_logprobs = self._logprobs_of(s, logprobs, cumulative)
            # Positional (the field order of CompletionOutput): called for every stream every step.
            completions.append(
                CompletionOutput(
                    s.index,
                    text,
                    all_ids,
                    s.cumulative_logprob,
                    all_logprobs,
                    s.finish_reason,
                    s.stop_reason,
                    detokenizer.get_next_delta(),
                    delta_ids,
                    delta_logprobs,
                )
            )
        if finished:
            state.metrics.finished_time = now
            self._requests.pop(state.request_id, None)
            for s in state.sequences:
                self._sequences.pop(s.request.req_id, None)
        num_cached_tokens = state.sequences[0].request.num_cached_tokens
        # Positional, in RequestOutput's field order (as CompletionOutput above).
        return RequestOutput(
            state.request_id,
            state.prompt,
            state.prompt_token_ids,
            completions,
            finished,
            state.prompt_logprobs,
            num_cached_tokens if num_cached_tokens > 0 else 0,
            state.metrics,
            state.error,
        )

    @staticmethod
    def _logprobs_of(
        s: _Sequence, logprobs: list[PositionLogprobs], cumulative: bool
    ) -> tuple[Sequence[PositionLogprobs], list[PositionLogprobs]]:
        """(the whole sequence's logprobs as this output carries them, the new ones)."""
        delta = logprobs[s.num_sent_logprobs :]
        k = s.num_sent_logprobs = len(logprobs)
        if s.finish_reason is not None:
            return logprobs, delta
        if cumulative:
            return (logprobs[:] if k < _VIEW_MIN_LEN else PrefixView(logprobs, k)), delta
        return [], delta

    def _position_logprobs(self, lp: TokenLogprobs) -> PositionLogprobs:
        """One position's logprobs; its token strings were decoded by `token_texts.add` this step."""
        texts = self.token_texts.texts
        entry: PositionLogprobs = {}
        for rank, (tok, logprob) in enumerate(zip(lp.token_ids, lp.logprobs, strict=True), start=1):
            entry[tok] = Logprob(logprob, rank, texts[tok])
        chosen = lp.chosen_token_id
        if chosen not in entry:
            entry[chosen] = Logprob(lp.chosen_logprob, lp.chosen_rank, texts[chosen])
        return entry


def _rank_key(s: _Sequence) -> tuple[float, int]:
    """Sort key of best_of's ranking: highest cumulative logprob first, then the lower index."""
    return (-(s.cumulative_logprob or 0.0), s.index)


def _ids_of(positions: Iterable[TokenLogprobs]) -> list[int]:
    """Every token id the logprob positions name (top-N and chosen)."""
    ids: list[int] = []
    for lp in positions:
        ids += lp.token_ids
        ids.append(lp.chosen_token_id)
    return ids
