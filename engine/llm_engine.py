"""The step-level engine: add_request, step, abort_request, has_unfinished_requests.

A step is schedule, execute, update. The engine owns the bookkeeping halves (`schedule()`,
`update(...)`: plain Python plus detokenization); the step pipeline (engine/executor/step_pipeline.py)
owns the trip to the device through the executor, and with async scheduling (the default) launches
step N+1 before applying step N, so step N's update hides behind the device's work. The async
engine drives the same pipeline, running its device half on a worker thread.

Parallel sampling (n > 1) fans a request out into n child requests that share the prompt's KV blocks
through the prefix cache; their outputs are gathered back into one RequestOutput.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.config import EngineConfig, ResolvedConfig
from engine.core.request import Request, RequestStatus
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from engine.errors import EngineShutdownError, InvalidRequestError
from engine.executor.executor import Executor, UniprocExecutor
from engine.executor.step_loop_times import StepLoopTimes
from engine.executor.step_pipeline import StepPipeline
from engine.inputs.input_processor import EngineRequest, InputProcessor
from engine.inputs.tokenizer import load_tokenizer
from engine.outputs.detokenizer import IncrementalDetokenizer
from engine.outputs.request_output import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from engine.protocol import EngineStats

logger = logging.getLogger("weir.engine")


@dataclass(slots=True, eq=False)
class _Child:
    """One of the n sequences of a request: its scheduler Request plus output-side state."""

    index: int
    parent_id: str
    request: Request
    parent: _ParentState = field(init=False)
    detokenizer: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    new_token_ids: list[int] = field(default_factory=list)  # since the last emitted output
    reported_final: bool = False


@dataclass(slots=True, eq=False)
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[_Child]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = None
    cumulative: bool = True  # params.output_kind == "cumulative": an output after every step

    def __post_init__(self) -> None:
        self.cumulative = self.params.output_kind == "cumulative"
        for c in self.children:
            c.parent = self

    @property
    def finished(self) -> bool:
        for c in self.children:
            if c.finish_reason is None:
                return False
        return True


class LLMEngine:
    def __init__(self, config: EngineConfig | ResolvedConfig) -> None:
        start = time.perf_counter()
        resolved = config.resolve() if isinstance(config, EngineConfig) else config
        self.tokenizer = load_tokenizer(resolved.load.tokenizer)
        self.executor: Executor = UniprocExecutor(resolved)
        num_blocks = self.executor.determine_num_kv_blocks()
        self.executor.initialize_kv_cache(num_blocks)
        # The one write after resolution: the cache's size (and max_model_len capped to it).
        self.config = config = resolved.with_num_kv_blocks(num_blocks)
        self.model_config = config.model
        self.num_kv_blocks = num_blocks
        self.max_model_len = config.scheduler.max_model_len
        self.vocab_size = config.model.vocab_size
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.scheduler = Scheduler(config.scheduler, config.cache)
        eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos_token_ids.add(self.tokenizer.eos_token_id)
        self.input_processor = InputProcessor(
            self.tokenizer,
            self.vocab_size,
            self.max_model_len,
            config.cache.block_size,
            num_blocks,
            eos_token_ids,
        )
        self._parents: dict[str, _ParentState] = {}
        self._children: dict[str, _Child] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        # Seconds by phase of the step primitives, whoever drives them (step() or the server's loop).
        self.step_times = StepLoopTimes()
        self._shut_down = False
        # The trip to the device and the step in flight, for step() and the server's loop alike.
        self.pipeline = StepPipeline(self.executor, self.step_times, config.scheduler.async_scheduling)
        self.startup_seconds = time.perf_counter() - start
        logger.info(
            "engine ready: model=%s device=%s dtype=%s kv_blocks=%d block_size=%d max_model_len=%d (%.1fs)",
            config.model.model_path,
            config.device.device,
            config.model.dtype,
            num_blocks,
            config.cache.block_size,
            self.max_model_len,
            self.startup_seconds,
        )

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        prompt_text: str | None = None,
    ) -> None:
        """Validate and enqueue a request. Raises InvalidRequestError (a ValueError) naming the bad field
        and its limit.

        `prompt_text` is the text a token-id prompt came from, when the caller tokenized it already.
        """
        if request_id in self._parents:
            raise InvalidRequestError("request_id", f"request_id {request_id!r} is already in use")
        request = self.input_processor.process(request_id, prompt, params, priority, cache_salt, prompt_text)
        self.add_engine_request(request)

    def add_engine_request(self, request: EngineRequest) -> None:
        """Enqueue a request the input processor made; it is trusted as it is."""
        if self._shut_down:
            raise EngineShutdownError("the engine was shut down; build a new one to generate")
        request_id = request.request_id
        if request_id in self._parents:
            raise InvalidRequestError("request_id", f"request_id {request_id!r} is already in use")
        params = request.sampling_params
        prompt_token_ids = request.prompt_token_ids
        children: list[_Child] = []
        for i in range(params.n):
            child_params = params if params.n == 1 else params.clone_for_child(i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            if child_id in self._children:
                raise InvalidRequestError("request_id", f"request_id {child_id!r} is already in use")
            req = Request(
                req_id=child_id,
                prompt_token_ids=prompt_token_ids,
                sampling_params=child_params,
                arrival_time=request.arrival_time,
                priority=request.priority,
                cache_salt=request.cache_salt,
            )
            children.append(
                _Child(
                    index=i,
                    parent_id=request_id,
                    request=req,
                    detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child_params),
                    logprobs=[] if params.logprobs is not None else None,
                    cumulative_logprob=0.0 if params.logprobs is not None else None,
                )
            )
        for child in children:
            self.scheduler.add_request(child.request)
        parent = _ParentState(
            request_id=request_id,
            prompt=request.prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            children=children,
            metrics=RequestMetrics(arrival_time=request.arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        self._parents[request_id] = parent
        for child in children:
            self._children[child.request.req_id] = child

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (by the ids given to add_request); their blocks are freed at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            parent = self._parents.pop(request_id, None)
            if parent is None:
                continue
            child_ids = [c.request.req_id for c in parent.children]
            self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
            for cid in child_ids:
                self._children.pop(cid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One engine iteration. Returns the outputs of the requests that changed.

        Synchronous (async_scheduling=False): schedule, execute, update. Async: schedule and launch
        step N+1, then update with step N's results while the device runs N+1; the outputs returned
        are step N's.
        """
        outputs = self.pipeline.step(self.schedule(), self)
        if not self._parents and self.pipeline.in_flight:
            # Everything finished with the step just launched: its tokens are unneeded, but wait for
            # it so that an idle engine has nothing left on the device.
            self.pipeline.flush(self)
        return outputs

    def flush(self) -> list[RequestOutput]:
        """Apply the step in flight, if any (async scheduling): afterwards the device holds no step
        of this engine, and schedule/execute/update may be driven by hand."""
        return self.pipeline.flush(self)

    # schedule and update count their time in `step_times` (engine/step_loop_times.py), as the
    # pipeline does for launch and device wait, so every driver (step() here, the server's step
    # loop) is measured the same way.
    def schedule(self) -> SchedulerOutput:
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        self._prompt_tokens_total += scheduler_output.num_prompt_tokens
        self.step_times.schedule += time.perf_counter() - start
        return scheduler_output

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """The forward pass and sampling of one step, waited for (nothing may be in flight: call
        flush() first under async scheduling). For driving the step by hand."""
        return self.pipeline.execute(scheduler_output)

    def update(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput | None
    ) -> list[RequestOutput]:
        """Apply a step's results: tokens, stops, detokenization; the outputs of the requests that
        changed."""
        start = time.perf_counter()
        try:
            return self._apply(scheduler_output, runner_output)
        finally:
            self.step_times.update += time.perf_counter() - start

    def _apply(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput | None
    ) -> list[RequestOutput]:
        now = time.monotonic()
        touched: dict[str, _ParentState] = {}
        if runner_output is None:
            return []
        if runner_output.prompt_logprobs:
            starts = {c.req_id: c.num_computed_tokens for c in scheduler_output.cached_requests}
            starts.update((r.req_id, r.num_computed_tokens) for r in scheduler_output.new_requests)
            scheduled = self.scheduler.scheduled_requests(scheduler_output)
        for req_id, entries in runner_output.prompt_logprobs.items():
            child = self._children.get(req_id)
            if child is None or child.index != 0 or child.request is not scheduled.get(req_id):
                continue
            parent = self._parents[child.parent_id]
            assert parent.prompt_logprobs is not None
            # Entry k scores prompt position start + 1 + k. After a preemption mid-prefill the runner
            # recomputes positions it already reported; keep only positions not yet collected.
            start = starts[req_id]
            for k, entry in enumerate(entries):
                if start + 1 + k == len(parent.prompt_logprobs):
                    parent.prompt_logprobs.append(self._to_position_logprobs(entry))

        # Hot loop (every running request, every step): plain lookups, statuses compared once.
        children = self._children
        logprobs_of = runner_output.logprobs
        stopped = RequestStatus.FINISHED_STOPPED
        num_generated = 0
        for request, new_token_ids in self.scheduler.update_from_output(scheduler_output, runner_output):
            child = children.get(request.req_id)
            if child is None or child.request is not request:
                continue
            parent = child.parent
            metrics = parent.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                metrics.first_scheduled_time = request.first_scheduled_time
            num_generated += len(new_token_ids)
            child.new_token_ids += new_token_ids
            if logprobs_of and child.logprobs is not None:
                lp = logprobs_of.get(request.req_id)
                if lp is not None:
                    child.logprobs.append(self._to_position_logprobs(lp))
                    child.cumulative_logprob = (child.cumulative_logprob or 0.0) + lp.chosen_logprob
            # A stop token's own text is left out of the output, as vLLM does (EOS is special anyway).
            status = request.status
            stop_str = child.detokenizer.update(new_token_ids, stop_terminated=status == stopped)
            if stop_str is not None and status < stopped:
                request.stop_reason = stop_str
                self.scheduler.finish_requests([request.req_id], stopped)
                status = request.status
            if status >= stopped:
                child.finish_reason = status.finish_reason
                child.detokenizer.finish()
            if parent.cumulative or parent.finished:
                touched[parent.request_id] = parent
        self._generation_tokens_total += num_generated
        return [self._make_output(p, now) for p in touched.values()]

    def fail_scheduled(self, scheduler_output: SchedulerOutput, exc: BaseException) -> list[RequestOutput]:
        """The forward pass raised: fail every request it held, free their blocks, report the error."""
        logger.exception(
            "forward pass failed; failing %d request(s)", len(scheduler_output.num_scheduled_tokens)
        )
        message = f"the forward pass failed: {type(exc).__name__}: {exc}"
        self.scheduler.drop_step(scheduler_output)
        now = time.monotonic()
        failed: dict[str, _ParentState] = {}
        for req_id in scheduler_output.num_scheduled_tokens:
            child = self._children.get(req_id)
            if child is None:
                continue
            parent = self._parents[child.parent_id]
            failed[parent.request_id] = parent
        outputs = []
        for parent in failed.values():
            ids = [c.request.req_id for c in parent.children]
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR)
            parent.error = message
            for c in parent.children:
                if c.finish_reason is None:
                    c.finish_reason = "error"
                    c.detokenizer.finish()
            outputs.append(self._make_output(parent, now))
        return outputs

    def abort_all(self) -> list[RequestOutput]:
        """Abort every request (server shutdown); returns their final outputs (finish_reason "abort")."""
        now = time.monotonic()
        outputs = []
        for parent in list(self._parents.values()):
            ids = [c.request.req_id for c in parent.children]
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            for c in parent.children:
                if c.finish_reason is None:
                    c.finish_reason = "abort"
                    c.detokenizer.finish()
            outputs.append(self._make_output(parent, now))
        return outputs

    # ------------------------------------------------------------------ outputs
    def _make_output(self, parent: _ParentState, now: float) -> RequestOutput:
        completions = []
        for c in parent.children:
            delta_ids, c.new_token_ids = c.new_token_ids, []
            detokenizer, request = c.detokenizer, c.request
            # Positional (the field order of CompletionOutput): called for every stream every step.
            completions.append(
                CompletionOutput(
                    c.index,
                    detokenizer.output_text,
                    request.output_token_ids[:],
                    c.cumulative_logprob,
                    c.logprobs,
                    c.finish_reason,
                    request.stop_reason,
                    detokenizer.get_next_delta(),
                    delta_ids,
                )
            )
        finished = parent.finished
        if finished:
            parent.metrics.finished_time = now
            self._parents.pop(parent.request_id, None)
            for c in parent.children:
                self._children.pop(c.request.req_id, None)
        first = parent.children[0].request
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            metrics=parent.metrics,
            error=parent.error,
        )

    def _to_position_logprobs(self, lp: TokenLogprobs) -> PositionLogprobs:
        entry: PositionLogprobs = {}
        for rank, (tok, logprob) in enumerate(zip(lp.token_ids, lp.logprobs, strict=True), start=1):
            entry[tok] = Logprob(logprob=logprob, rank=rank, decoded_token=self.tokenizer.decode([tok]))
        if lp.chosen_token_id not in entry:
            entry[lp.chosen_token_id] = Logprob(
                logprob=lp.chosen_logprob,
                rank=lp.chosen_rank,
                decoded_token=self.tokenizer.decode([lp.chosen_token_id]),
            )
        return entry

    # ------------------------------------------------------------------ introspection
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_waiting_tokens=s.num_waiting_tokens,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            step_loop=self.step_times.as_dict(),
        )

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Abort every request and free what the engine holds on the device (model, KV cache, CUDA
        graphs) now, rather than whenever the last reference goes. Idempotent; afterwards adding a
        request raises EngineShutdownError, while stats() still answers."""
        if self._shut_down:
            return
        self._shut_down = True
        self.pipeline.discard()  # its results are not wanted; the device tensors it holds may go
        self.abort_all()
        self.executor.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
