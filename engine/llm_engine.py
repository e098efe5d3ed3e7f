"""The step-level engine: add_request, step, abort_request, has_unfinished_requests.

A step is schedule, execute, update. The engine owns the bookkeeping halves (`schedule()`,
`update(...)`: plain Python plus detokenization); the step pipeline (engine/executor/step_pipeline.py)
owns the trip to the device through the executor, and with async scheduling (the default) launches
step N+1 before applying step N, so step N's update hides behind the device's work. The async
engine drives the same pipeline, running its device half on a worker thread.

Requests come in through the input processor (engine/inputs/input_processor.py: validated once, an
immutable EngineRequest); a step's results go out through the output processor
(engine/outputs/output_processor.py: detokenization, stop strings, deltas per step).

Parallel sampling (n > 1) fans a request out into n child requests (best_of of them when best_of > n)
that share the prompt's KV blocks: one computes the prompt, the others fork its blocks copy-on-write
(engine/core/scheduler.py); their outputs are gathered back into one RequestOutput (the n with the
highest cumulative logprob, for best_of).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from engine.beam_search import BeamSearchDriver
from engine.config import EngineConfig, ResolvedConfig
from engine.core.request import Request, RequestStatus
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.errors import EngineShutdownError, InvalidRequestError
from engine.executor.executor import Executor
from engine.executor.factory import create_executor
from engine.executor.step_loop_times import StepLoopTimes
from engine.executor.step_pipeline import StepPipeline
from engine.inputs.input_processor import EngineRequest, InputProcessor, check_request_types
from engine.inputs.tokenizer import TokenizerLoad
from engine.lora.request import LoRARequest
from engine.outputs.output_processor import OutputProcessor
from engine.outputs.request_output import RequestOutput
from engine.protocol import EngineStats
from engine.startup_phases import StartupPhases

logger = logging.getLogger("weir.engine")


class LLMEngine:
    def __init__(
        self, config: EngineConfig | ResolvedConfig, startup_phases: StartupPhases | None = None
    ) -> None:
        """`startup_phases`: where to record the start-up phases (engine/startup_phases.py); by default
        a recorder of this engine's own, started now."""
        start = time.perf_counter()
        self.startup_phases = phases = startup_phases or StartupPhases(start)
        with phases.phase("config"):
            resolved = config.resolve() if isinstance(config, EngineConfig) else config
        # On a CPU the tokenizer loads on a thread of its own while the model is built, loaded and
        # profiled (torch's CPU kernels release the GIL while they compute: the two overlap). On CUDA
        # it loads first: the main thread's work there is launching kernels, which holds the GIL between
        # short releases, and a thread importing transformers beside it made both slower. H200, `weir
        # serve` of an 8B shape to its first request: 14.9 s loaded first, 20.1-20.3 s beside (model
        # build 0.27 vs 1.6 s, memory profile 1.4 vs 5.7 s, graph capture 2.5 vs 5.0 s; a 50 us GIL
        # switch interval while the thread ran gave 14.7 s; loadtest/results/u1-beam-s1inf-h200-*).
        tokenizer_load = TokenizerLoad(resolved.load.tokenizer)
        on_cuda = resolved.device.device == "cuda"
        executor: Executor | None = None
        try:
            if on_cuda:
                with phases.phase("tokenizer"):
                    self.tokenizer = tokenizer_load.result()
            with phases.phase("model_build"):  # what the runner does not time as weights is building
                executor = create_executor(resolved)
                phases.add("weights", executor.startup_timings().get("weights_load_s", 0.0))
            with phases.phase("kv_cache"):  # the capture of the CUDA graphs runs inside
                num_blocks = executor.determine_num_kv_blocks()
                executor.initialize_kv_cache(num_blocks)
                phases.add("cuda_graphs", executor.startup_timings().get("cuda_graph_capture_s", 0.0))
            if not on_cuda:
                with phases.phase("tokenizer"):
                    self.tokenizer = tokenizer_load.result()
        except BaseException as exc:
            if executor is not None:
                executor.shutdown()  # worker processes must not outlive a failed start
            if isinstance(exc, Exception):
                # A tokenizer that cannot load is the error reported, as when it loaded first.
                tokenizer_error = tokenizer_load.exception()
                if tokenizer_error is not None and tokenizer_error is not exc:
                    raise tokenizer_error from tokenizer_error.__cause__
            raise
        self.executor: Executor = executor
        # Which loader read the tokenizer: weir's own (`tokenizers`, no transformers import) or
        # transformers' AutoTokenizer, with the reason weir's own could not.
        phases.labels["tokenizer_loader"] = tokenizer_load.loader or ""
        logger.info(
            "tokenizer loaded in %.2fs by %s%s%s",
            tokenizer_load.seconds,
            tokenizer_load.loader,
            f" ({tokenizer_load.fallback_reason})" if tokenizer_load.fallback_reason else "",
            "" if on_cuda else ", beside the model",
        )
        # The one write after resolution: the cache's size (and max_model_len capped to it).
        self.config = config = resolved.with_num_kv_blocks(num_blocks)
        self.model_config = config.model
        self.num_kv_blocks = num_blocks
        self.max_model_len = config.scheduler.max_model_len
        self.vocab_size = config.model.vocab_size
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.scheduler = Scheduler(
            config.scheduler, config.cache, config.lora.max_loras if config.lora is not None else 0
        )
        # lora_int_id -> the adapter registered under it (add_lora; loaded in the workers' caches).
        self._loras: dict[int, LoRARequest] = {}
        cache = config.cache
        self._cache_config = {
            "block_size": str(cache.block_size),
            "cache_dtype": cache.kv_cache_dtype,
            "num_gpu_blocks": str(num_blocks),
            "enable_prefix_caching": str(cache.enable_prefix_caching),
        }
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
            config.scheduler.max_best_of,
            config.scheduler.max_beam_width,
            config.scheduler.max_num_seqs,
            enable_lora=config.lora is not None,
            sliding_window=config.cache.sliding_window,
            max_chunk_tokens=config.scheduler.max_chunk_tokens,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.beam_search = BeamSearchDriver(self.scheduler, self.tokenizer, self.vocab_size)
        self._prompt_tokens_total = 0
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
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validate and enqueue a request. Raises InvalidRequestError (a ValueError) naming the bad field
        and its limit.

        `prompt_text` is the text a token-id prompt came from, when the caller tokenized it already.
        `lora_request`: the LoRA adapter to run it with (loaded first if it was not added yet; a bad
        adapter raises LoRAAdapterError, a ValueError).
        """
        check_request_types(request_id, params, priority)  # a list id is unhashable just below
        if request_id in self.output_processor or request_id in self.beam_search:
            raise InvalidRequestError("request_id", f"request_id {request_id!r} is already in use")
        request = self.input_processor.process(
            request_id, prompt, params, priority, cache_salt, prompt_text, lora_request
        )
        if lora_request is not None and not self.has_lora(lora_request):
            self.add_lora(lora_request)
        self.add_engine_request(request)

    def add_engine_request(self, request: EngineRequest) -> None:
        """Enqueue a request the input processor made; it is trusted as it is."""
        if self._shut_down:
            raise EngineShutdownError("the engine was shut down; build a new one to generate")
        request_id = request.request_id
        if request_id in self.output_processor or request_id in self.beam_search:
            raise InvalidRequestError("request_id", f"request_id {request_id!r} is already in use")
        params = request.sampling_params
        if params.use_beam_search:
            self.beam_search.add(request)  # its beams run as a group (engine/beam_search.py)
            return
        sequences: list[Request] = []
        # best_of > n: best_of children run; the output processor returns the n best at the end.
        num_sequences = params.num_sequences
        for i in range(num_sequences):
            child_id = request_id if num_sequences == 1 else f"{request_id}#{i}"
            # The scheduler's ids too: a beam's sequences (`ID#beam0`) are not the output processor's,
            # and a collision found by scheduler.add_request below, after the output processor took
            # the request, left it unfinished forever (has_unfinished_requests() stayed True).
            if self.output_processor.has_sequence(child_id) or self.scheduler.get_request(child_id):
                raise InvalidRequestError("request_id", f"request_id {child_id!r} is already in use")
            sequences.append(
                Request(
                    req_id=child_id,
                    prompt_token_ids=request.prompt_token_ids,
                    sampling_params=params if num_sequences == 1 else params.clone_for_child(i),
                    arrival_time=request.arrival_time,
                    priority=request.priority,
                    cache_salt=request.cache_salt,
                    lora_request=request.lora_request,
                )
            )
        if num_sequences > 1:
            for seq in sequences:
                seq.group = sequences  # one prefill: the others fork its prompt's blocks
        self.output_processor.add_request(request, sequences)
        for seq in sequences:
            self.scheduler.add_request(seq)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (by the ids given to add_request); their blocks are freed at once."""
        for request_id in _request_id_list(request_ids):
            if self.beam_search.abort(request_id):
                continue
            seq_ids = self.output_processor.abort(request_id)
            if seq_ids is not None:
                self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)

    def abort_request_with_output(self, request_id: str) -> RequestOutput | None:
        """Abort one request as abort_request does, returning its final output (finish_reason
        "abort", what it had generated so far), for a stream that must end; None if unknown."""
        if not isinstance(request_id, str):  # an int id matched nothing: silently no abort
            raise TypeError(f"request_id must be a str; got {type(request_id).__name__}")
        now = time.monotonic()
        final = self.beam_search.abort_with_output(request_id, now)
        if final is not None:
            return final
        final, seq_ids = self.output_processor.end(request_id, "abort", now)
        self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
        return final

    def has_unfinished_requests(self) -> bool:
        return bool(len(self.output_processor)) or bool(len(self.beam_search))

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor) + len(self.beam_search)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One engine iteration. Returns the outputs of the requests that changed.

        Synchronous (async_scheduling=False): schedule, execute, update. Async: schedule and launch
        step N+1, then update with step N's results while the device runs N+1; the outputs returned
        are step N's.
        """
        outputs = self.pipeline.step(self.schedule(), self)
        if self.pipeline.in_flight and not self.has_unfinished_requests():
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
        if runner_output is None:
            return []
        now = time.monotonic()
        processor = self.output_processor
        if runner_output.prompt_logprobs:
            processor.add_prompt_logprobs(
                scheduler_output,
                runner_output.prompt_logprobs,
                self.scheduler.scheduled_requests(scheduler_output),
            )
        updates = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs, stopped_ids = processor.process(updates, runner_output.logprobs, now)
        if len(self.beam_search):
            outputs += self.beam_search.process(
                updates, runner_output.beam_candidates, now, runner_output.device_beams
            )
        if stopped_ids:  # stop strings, found by the detokenizer
            self.scheduler.finish_requests(stopped_ids, RequestStatus.FINISHED_STOPPED)
        return outputs

    def fail_scheduled(self, scheduler_output: SchedulerOutput, exc: BaseException) -> list[RequestOutput]:
        """The forward pass raised: fail every request it held, free their blocks, report the error."""
        logger.exception(
            "forward pass failed; failing %d request(s)", len(scheduler_output.num_scheduled_tokens)
        )
        message = f"the forward pass failed: {type(exc).__name__}: {exc}"
        self.scheduler.drop_step(scheduler_output)
        now = time.monotonic()
        outputs, seq_ids = self.output_processor.fail(scheduler_output.num_scheduled_tokens, message, now)
        self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ERROR)
        failed = [*scheduler_output.num_scheduled_tokens, *(s.group_id for s in scheduler_output.beam_steps)]
        return outputs + self.beam_search.fail(failed, message, now)

    def abort_all(self) -> list[RequestOutput]:
        """Abort every request (server shutdown); returns their final outputs (finish_reason "abort")."""
        now = time.monotonic()
        outputs, seq_ids = self.output_processor.abort_all(now)
        self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
        return outputs + self.beam_search.abort_all(now)

    # ------------------------------------------------------------------ LoRA adapters
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and check an adapter (into the workers' host cache) so requests can name it. False if
        this very adapter is registered already. Raises LoRAAdapterError (a ValueError naming the
        adapter and the field) for an adapter weir cannot serve, ValueError when LoRA is off or the
        id or name is taken by another adapter."""
        if self.config.lora is None:
            raise InvalidRequestError(
                "lora_request", "LoRA is off: build the engine with enable_lora=True to serve adapters"
            )
        current = self._loras.get(lora_request.lora_int_id)
        if current == lora_request:
            return False
        if current is not None:
            raise InvalidRequestError(
                "lora_int_id",
                f"lora_int_id {lora_request.lora_int_id} is already adapter {current.lora_name!r} "
                f"({current.lora_path}); remove it first",
            )
        for other in self._loras.values():
            if other.lora_name == lora_request.lora_name:
                raise InvalidRequestError(
                    "lora_name",
                    f"an adapter named {other.lora_name!r} is already loaded (lora_int_id {other.lora_int_id})",
                )
        self.executor.add_lora(lora_request)
        self._loras[lora_request.lora_int_id] = lora_request
        return True

    def remove_lora(self, lora: int | str) -> bool:
        """Unregister an adapter by lora_int_id or lora_name; False if none such. Requests already
        running on it finish with it."""
        for lora_id, req in list(self._loras.items()):
            if lora in (lora_id, req.lora_name) and not isinstance(lora, bool):
                del self._loras[lora_id]
                self.executor.remove_lora(lora_id)
                return True
        return False

    def list_loras(self) -> set[int]:
        """The lora_int_id of every registered adapter (vLLM's)."""
        return set(self._loras)

    def lora_requests(self) -> list[LoRARequest]:
        """The registered adapters, in the order they were added."""
        return list(self._loras.values())

    def has_lora(self, lora_request: LoRARequest) -> bool:
        """True when this very adapter (id, name and path) is registered."""
        return self._loras.get(lora_request.lora_int_id) == lora_request

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
            generation_tokens_total=self.output_processor.num_generation_tokens
            + self.beam_search.num_generation_tokens,
            step_loop=self.step_times.as_dict(),
            **self._lora_stats(),
            cache_config=self._cache_config,
        )

    def _lora_stats(self) -> dict:
        """Adapters of the running and the waiting requests (EngineStats' LoRA fields); {} without LoRA."""
        if self.config.lora is None:
            return {}
        running: dict[str, int] = {}
        waiting: dict[str, int] = {}
        for req in self.scheduler.requests.values():
            if req.lora_request is not None:
                counts = running if req.status == RequestStatus.RUNNING else waiting
                counts[req.lora_request.lora_name] = counts.get(req.lora_request.lora_name, 0) + 1
        return {
            "running_lora_adapters": running,
            "waiting_lora_adapters": waiting,
            "max_loras": self.config.lora.max_loras,
        }

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_shut_down(self) -> bool:
        return self._shut_down

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


def _request_id_list(request_ids: str | Iterable[str]) -> list[str]:
    """abort_request's ids as a list; TypeError naming request_id for anything but a str or an
    iterable of str (5 or None raised Python's bare "not iterable"; an int inside a list, or bytes,
    matched no request and was silently no abort)."""
    expected = "request_id must be a str or an iterable of str"
    if isinstance(request_ids, str):
        return [request_ids]
    if isinstance(request_ids, (bytes, bytearray)):
        raise TypeError(f"{expected}; got {type(request_ids).__name__}")
    try:
        ids = list(request_ids)
    except TypeError:
        raise TypeError(f"{expected}; got {type(request_ids).__name__}") from None
    for i, request_id in enumerate(ids):
        if not isinstance(request_id, str):
            raise TypeError(f"{expected}; got {type(request_id).__name__} at index {i}")
    return ids
