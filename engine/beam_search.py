"""Beam search in the engine: the public parameters and outputs (vLLM's names), and the driver that
runs a request's beams as a group through the scheduler.

A beam search request (SamplingParams.use_beam_search, n = the width k; or LLM.beam_search with
BeamSearchParams) becomes k beam Requests (engine/core/beam_scheduling.py). Each step every running
beam computes one token and the runner returns its top log-probabilities (the beams ask for
num_candidates of them); once all running beams of the group have theirs, the ranking
(engine/core/beam_search.py) picks the next k beams, and the driver moves the beam Requests to them:
a beam with a surviving continuation keeps its slot, the others' slots fork it copy-on-write, and dead
beams' blocks are freed at once. When the ranking stops, the k best finished hypotheses come back as
one final RequestOutput (whatever output_kind: a stream gets the final beams only).

After the first step (ranked here from the prompt's candidates), a group is handed to the device when
it can be (engine/core/beam_device.py: no stop strings, its tail blocks free): the runner
ranks every later step itself and sends the candidates back, and `process` replays each step's
ranking one step later, which keeps the finished hypotheses and decides when the search stops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.core.beam_ranking import rank_groups
from engine.core.beam_search import BeamSearchState, BeamStep, Hypothesis
from engine.core.request import Request, RequestStatus
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import BeamCandidates, DeviceBeamResults
from engine.errors import InvalidRequestError
from engine.inputs.input_processor import EngineRequest
from engine.outputs.request_output import CompletionOutput, RequestMetrics, RequestOutput


@dataclass(slots=True)
class BeamSearchParams:
    """LLM.beam_search's parameters (vLLM's names); early_stopping as transformers defines it."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    include_stop_str_in_output: bool = False

    def to_sampling_params(self) -> SamplingParams:
        """The engine's form (validated: a bad field raises InvalidRequestError naming it)."""
        try:
            return self._sampling_params()
        except InvalidRequestError as exc:
            if exc.param != "n":
                raise
            # The width is SamplingParams' n; the caller wrote beam_width, so name that.
            message = str(exc).replace("n must be", "beam_width must be", 1)
            raise InvalidRequestError("beam_width", message) from None

    def _sampling_params(self) -> SamplingParams:
        return SamplingParams(
            n=self.beam_width,
            use_beam_search=True,
            max_tokens=self.max_tokens,
            ignore_eos=self.ignore_eos,
            temperature=self.temperature,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
            include_stop_str_in_output=self.include_stop_str_in_output,
            output_kind="final_only",
        )


@dataclass(slots=True)
class BeamSearchSequence:
    """One returned beam: `tokens` is prompt + generated (vLLM's shape); `text` the generated text."""

    tokens: list[int]
    cum_logprob: float
    text: str
    score: float  # cum_logprob / generated length ** length_penalty: what the beams are ranked by
    finish_reason: str | None = None
    stop_reason: int | None = None
    logprobs: list[Any] = field(default_factory=list)  # not collected (vLLM's field, kept for shape)


@dataclass(slots=True)
class BeamSearchOutput:
    """The beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


class _Candidates:
    """A step's BeamCandidates as arrays, and which row holds which beam."""

    __slots__ = ("row_of", "token_ids", "logprobs")

    def __init__(self, c: BeamCandidates) -> None:
        self.row_of = {req_id: i for i, req_id in enumerate(c.req_ids)}
        shape = (len(c.req_ids), c.num_top)
        self.token_ids = np.frombuffer(c.token_ids, dtype=np.int64).reshape(shape)  # [R, N]
        self.logprobs = np.frombuffer(c.logprobs, dtype=np.float64).reshape(shape)  # [R, N]


@dataclass(slots=True, eq=False)
class _BeamGroup:
    request: EngineRequest
    state: BeamSearchState
    slots: list[Request]  # the k beam Requests (fixed; which beam each holds changes)
    running: list[Request]  # the slot of running beam i, in the ranking's order
    results: dict[str, tuple[_Candidates, int]]  # this step's: each beam's (step's candidates, row)
    metrics: RequestMetrics
    device_id: str | None = None  # set once its steps are ranked on the device
    host_only: bool = False  # started again after a preemption on the device: ranked on the host


class BeamSearchDriver:
    """The engine's beam search groups: created by LLMEngine.add_engine_request, advanced by its update."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, vocab_size: int) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._groups: dict[str, _BeamGroup] = {}  # by request id
        self._by_beam: dict[str, _BeamGroup] = {}  # by beam req_id
        self._by_device: dict[str, _BeamGroup] = {}  # device-ranked groups, by their device group id
        scheduler.on_device_group_restart = self._restart
        self.num_generation_tokens = 0  # a token per running beam per step (Prometheus)

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def add(self, request: EngineRequest) -> None:
        params = request.sampling_params
        assert params.max_tokens is not None  # resolved by the input processor
        width = params.n
        state = BeamSearchState(
            width,
            params.all_stop_token_ids,
            params.max_tokens,
            params.length_penalty,
            params.early_stopping,
            self._stop_string_check(params),
        )
        # What the runner computes for a beam: its top log-probabilities (greedy, so no noise to draw).
        beam_params = params.copy()
        beam_params.n = 1
        beam_params.best_of = None
        beam_params.use_beam_search = False
        beam_params.logprobs = min(state.num_candidates, self.vocab_size)
        slots = [
            Request(
                req_id=f"{request.request_id}#beam{i}",
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=beam_params,
                arrival_time=request.arrival_time,
                priority=request.priority,
                cache_salt=request.cache_salt,
                lora_request=request.lora_request,
                is_beam=True,
            )
            for i in range(width)
        ]
        for slot in slots:
            slot.group = slots
        self.scheduler.add_beam_group(slots)
        group = _BeamGroup(request, state, slots, [slots[0]], {}, RequestMetrics(request.arrival_time))
        self._groups[request.request_id] = group
        for slot in slots:
            self._by_beam[slot.req_id] = group

    def _stop_string_check(self, params: SamplingParams) -> Callable[[list[int]], str | None] | None:
        """Whether a candidate's last token completes one of the stop strings: the text of a window of
        its last tokens (long enough for the longest stop string) with and without that token."""
        stops = params.stop
        if not stops:
            return None
        window = max(map(len, stops)) + 2
        decode = self.tokenizer.decode
        skip = params.skip_special_tokens

        def check(tokens: list[int]) -> str | None:
            tail = tokens[-window - 1 :]
            after = decode(tail, skip_special_tokens=skip)
            before = decode(tail[:-1], skip_special_tokens=skip)
            for stop in stops:
                if stop in after and stop not in before:
                    return stop
            return None

        return check

    # ------------------------------------------------------------------ a step's results
    def process(
        self,
        updates: Iterable[tuple[Request, list[int]]],
        candidates: BeamCandidates | None,
        now: float,
        device: DeviceBeamResults | None = None,
    ) -> list[RequestOutput]:
        """Collect the beams' results of a step; step every group whose running beams all have theirs
        (their candidates ranked together), and replay the device-ranked groups' steps (`device`).
        Returns the final outputs of the groups that finished."""
        outputs = self._replay_device(device, now) if device is not None else []
        if candidates is None:
            return outputs
        arrays = _Candidates(candidates)
        row_of = arrays.row_of
        by_beam = self._by_beam
        ready: list[_BeamGroup] = []
        for req, _ in updates:  # a loop per beam per step: kept to plain lookups
            if not req.is_beam:
                continue
            req_id = req.req_id
            row = row_of.get(req_id)
            group = by_beam.get(req_id)
            if group is None or row is None:
                continue
            results = group.results
            # Request compares by identity: `in` finds this very Request among the running beams.
            if req_id in results or req not in group.running:
                continue  # a beam recomputed after preemption keeps its first results (the same)
            if req.num_computed_tokens != len(req.all_token_ids):
                # Computed for tokens it no longer has: a beam recomputing after preemption whose
                # group stepped (extending or re-forking it) while that step was in flight.
                continue
            results[req_id] = (arrays, row)
            if len(results) == len(group.running):
                if group.metrics.first_token_time is None:
                    group.metrics.first_token_time = now
                    group.metrics.first_scheduled_time = group.slots[0].first_scheduled_time
                ready.append(group)
        if not ready:
            return outputs
        for group, step in zip(ready, self._rank(ready, arrays), strict=True):
            out = self._apply(group, step, now)
            if out is not None:
                outputs.append(out)
        return outputs

    def _rank(self, groups: list[_BeamGroup], arrays: _Candidates) -> list[BeamStep]:
        """The groups' steps: those whose beams' results all came in this step ranked together;
        a group with results from earlier steps too (beams recomputed after preemption) alone."""
        together: list[int] = []
        rows: list[list[int]] = []
        steps: list[BeamStep | None] = [None] * len(groups)
        for j, group in enumerate(groups):
            results = [group.results[beam.req_id] for beam in group.running]
            if all(a is arrays for a, _ in results):
                together.append(j)
                rows.append([r for _, r in results])
                continue
            k = group.slots[0].sampling_params.logprobs or 0
            top = [(a.token_ids[r, :k].tolist(), a.logprobs[r, :k].tolist()) for a, r in results]
            steps[j] = group.state.step(top)
        if together:
            ranked = rank_groups(
                [groups[j].state for j in together],
                rows,
                [groups[j].slots[0].sampling_params.logprobs or 0 for j in together],
                arrays.token_ids,
                arrays.logprobs,
            )
            for j, step in zip(together, ranked, strict=True):
                steps[j] = step
        for group in groups:
            self.num_generation_tokens += len(group.running)
            group.results.clear()
        return steps  # type: ignore[return-value]

    def _replay_device(self, results: DeviceBeamResults, now: float) -> list[RequestOutput]:
        """Each device-ranked group's step, from the candidates in the device's ranked order: the
        same continuations the device chose (the first `width` that hit no stopping criterion), the
        hits among the first `width` into the finished hypotheses, and the stopping rule."""
        table = np.frombuffer(results.candidates, dtype=np.float64).reshape(-1, 3)  # [sum, 3]
        scores = table[:, 0].tolist()
        parents = table[:, 1].astype(np.int64).tolist()
        tokens = table[:, 2].astype(np.int64).tolist()
        outputs = []
        at = 0
        for group_id, count in zip(results.group_ids, results.num_candidates, strict=True):
            group = self._by_device.get(group_id)
            end = at + count
            if group is None:  # ended while this step was in flight
                at = end
                continue
            state = group.state
            toks = tokens[at:end]
            width = state.width
            if state.can_advance_plainly(toks[:width]):
                runs = list(zip(parents[at : at + width], toks[:width], strict=True))
                step = state.advance_plainly(scores[at : at + width], runs)
            else:
                cands = zip(scores[at:end], parents[at:end], toks, strict=True)
                step = state.advance([(-a, b, t) for a, b, t in cands])
            self.num_generation_tokens += width
            at = end
            if step.done:
                outputs.append(self._finish(group, "stop", now))
            else:
                self.scheduler.advance_device_group(group.slots[0], [b for b, _ in step.continuations])
        return outputs

    def _restart(self, leader: Request) -> None:
        """The scheduler preempted the device-ranked group of `leader`: it recomputes its prompt and
        is ranked from its first step again (the same beams: the search is deterministic), on the host."""
        group = self._by_beam.get(leader.req_id)
        if group is None or group.device_id is None:
            return
        self._by_device.pop(group.device_id, None)
        group.state = group.state.restarted()
        group.running = [group.slots[0]]
        group.results = {}
        group.device_id = None
        group.host_only = True

    def _apply(self, group: _BeamGroup, step: BeamStep, now: float) -> RequestOutput | None:
        if step.done:
            return self._finish(group, "stop", now)
        if (
            group.state.num_generated == 1
            and self.scheduler.beam_device_ranking
            and self._to_device(group, step)
        ):
            return None
        # Slots: a parent's first continuation keeps its slot; the others take the slots of beams
        # with none (dead, or not used yet), forking the parent before it is extended.
        parents = group.running
        kept: set[int] = set()
        new_running: list[Request | None] = [None] * len(step.continuations)
        forks: list[int] = []
        for j, (parent, _) in enumerate(step.continuations):
            slot = parents[parent]
            if id(slot) in kept:
                forks.append(j)
            else:
                kept.add(id(slot))
                new_running[j] = slot
        free = [s for s in group.slots if id(s) not in kept]
        scheduler = self.scheduler
        for j in forks:
            parent, token = step.continuations[j]
            slot = free.pop()
            source = parents[parent]
            scheduler.fork_beam(slot, source, source.output_token_ids + [token])
            new_running[j] = slot
        for j, slot in enumerate(new_running):
            if j not in forks:
                assert slot is not None
                scheduler.extend_beam(slot, step.continuations[j][1])
        group.running = [s for s in new_running if s is not None]
        return None

    def _to_device(self, group: _BeamGroup, step: BeamStep) -> bool:
        """Hand the group's next steps to the device, if it can go (see the module docstring)."""
        state = group.state
        if group.host_only or state.stop_string is not None:
            return False
        device_id = self.scheduler.start_device_group(
            group.slots,
            [token for _, token in step.continuations],
            list(state.scores),
            sorted(state.stop_token_ids),
            state.num_candidates,
        )
        if device_id is None:
            return False
        group.device_id = device_id
        self._by_device[device_id] = group
        return True

    # ------------------------------------------------------------------ ends
    def _finish(self, group: _BeamGroup, reason: str, now: float, error: str | None = None) -> RequestOutput:
        request = group.request
        params = request.sampling_params
        self._drop(group)
        status = {
            "abort": RequestStatus.FINISHED_ABORTED,
            "error": RequestStatus.FINISHED_ERROR,
        }.get(reason, RequestStatus.FINISHED_STOPPED)
        self.scheduler.finish_requests([s.req_id for s in group.slots], status)
        if reason == "stop":
            hyps = group.state.results()[: params.n]
        else:  # aborted or failed: the running beams as they are
            hyps = [
                Hypothesis(tokens, float(score), float(score), reason)
                for tokens, score in zip(group.state.outputs, group.state.scores, strict=False)
            ]
        completions = []
        for i, hyp in enumerate(hyps):
            text = self._text(hyp, params)
            last = hyp.token_ids[-1] if hyp.token_ids else None
            stop_reason: int | str | None = hyp.stop_str
            if stop_reason is None and hyp.finish_reason == "stop" and last in (params.stop_token_ids or ()):
                stop_reason = last
            completions.append(
                CompletionOutput(
                    i,
                    text,
                    hyp.token_ids,
                    hyp.cum_logprob,
                    None,
                    hyp.finish_reason,
                    stop_reason,
                    text,
                    list(hyp.token_ids),
                    None,
                )
            )
        group.metrics.finished_time = now
        cached = group.slots[0].num_cached_tokens
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            completions,
            True,
            None,
            cached if cached > 0 else 0,
            group.metrics,
            error,
        )

    def _text(self, hyp: Hypothesis, params: SamplingParams) -> str:
        ids = hyp.token_ids
        skip = params.skip_special_tokens
        if hyp.stop_str is not None:
            # Up to the stop string (which the last token completed), with it if asked, as vLLM does.
            text = self.tokenizer.decode(ids, skip_special_tokens=skip)
            before = self.tokenizer.decode(ids[:-1], skip_special_tokens=skip)
            at = text.find(hyp.stop_str, max(0, len(before) - len(hyp.stop_str) + 1))
            if at < 0:
                at = text.rfind(hyp.stop_str)
            return text[: at + (len(hyp.stop_str) if params.include_stop_str_in_output else 0)]
        if hyp.finish_reason == "stop" and ids and not params.include_stop_str_in_output:
            ids = ids[:-1]  # the stop token's text is left out, as for sampled requests
        return self.tokenizer.decode(ids, skip_special_tokens=skip)

    def _drop(self, group: _BeamGroup) -> None:
        self._groups.pop(group.request.request_id, None)
        if group.device_id is not None:
            self._by_device.pop(group.device_id, None)
        for slot in group.slots:
            self._by_beam.pop(slot.req_id, None)

    def abort(self, request_id: str) -> bool:
        """Forget a request without an output; its beams' blocks are freed. False if unknown."""
        group = self._groups.get(request_id)
        if group is None:
            return False
        self._drop(group)
        self.scheduler.finish_requests([s.req_id for s in group.slots], RequestStatus.FINISHED_ABORTED)
        return True

    def abort_with_output(self, request_id: str, now: float) -> RequestOutput | None:
        """Abort one group, returning its final output (the running beams as they are); None if unknown."""
        group = self._groups.get(request_id)
        return None if group is None else self._finish(group, "abort", now)

    def abort_all(self, now: float) -> list[RequestOutput]:
        return [self._finish(g, "abort", now) for g in list(self._groups.values())]

    def fail(self, req_ids: Iterable[str], message: str, now: float) -> list[RequestOutput]:
        """The forward pass that computed `req_ids` failed: their groups end with finish_reason "error"."""
        failed = {}
        for req_id in req_ids:
            group = self._by_beam.get(req_id) or self._by_device.get(req_id)
            if group is not None:
                failed[group.request.request_id] = group
        return [self._finish(g, "error", now, message) for g in failed.values()]
