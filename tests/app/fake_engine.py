"""A stand-in for `engine.async_engine.AsyncEngine`: an `EngineClient` (engine/protocol.py) with a
real tokenizer. tests/app/test_engine_protocol.py holds it to the protocol, as the engine is.

Tokens come from a seeded pseudo-random generator instead of a model, so it needs no torch and
is fast; what it is for is what the real engine makes hard to provoke: a forward pass that raises,
a loop that dies, a queue that does not move (`pause()`), a slow step (`step_delay`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.sampling_params import SamplingParams
from engine.errors import EngineDeadError, EngineDrainingError, QueueFullError
from engine.inputs.input_processor import InputProcessor
from engine.lora.request import LoRARequest
from engine.outputs.request_output import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.protocol import EngineClient, EngineStats
from engine.startup_phases import StartupPhases

FIRST_PLAIN_TOKEN = 5  # ids below are the tiny tokenizer's special tokens


@dataclass(slots=True)
class _Seq:
    index: int
    rng: random.Random
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0
    sent_text: int = 0
    sent_logprobs: int = 0


@dataclass(slots=True, eq=False)
class _Req:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    seqs: list[_Seq]
    queue: Any  # new_output_queue()'s
    metrics: RequestMetrics
    lora_request: LoRARequest | None = None
    finished: bool = False
    error: str | None = None


class FakeEngine(EngineClient):
    # Makes each request's output queue (`put_nowait`, `await get()`); loadtest/profile_serving.py's
    # subclass uses the real engine's OutputChannel, so the app's per-token hand-over costs as there.
    new_output_queue: Callable[[], Any] = asyncio.Queue

    def __init__(
        self,
        tokenizer_dir: Path | str,
        *,
        max_model_len: int = 256,
        vocab_size: int = 512,
        max_num_seqs: int = 16,
        step_delay: float = 0.002,
        max_waiting_requests: int = 1024,
        max_waiting_tokens: int = 1 << 20,
        kv_capacity_tokens: int = 16384,
        max_loras: int = 0,
    ) -> None:
        from transformers import AutoTokenizer

        self.startup_phases = StartupPhases()
        with self.startup_phases.phase("tokenizer"):
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.model_path = str(tokenizer_dir)
        self.generation_defaults: dict[str, Any] = {}
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.step_delay = step_delay
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self.kv_capacity_tokens = kv_capacity_tokens
        self._healthy = True
        self.dead_error: BaseException | None = None
        self.warm = False
        # Fault injection: the next step raises this for every running request (the engine goes on),
        # or kills the loop (the engine is dead).
        self.fail_next_step: BaseException | None = None
        self.die_next_step: BaseException | None = None
        # ... or makes the next request's output stream raise after its first output.
        self.raise_in_next_stream: BaseException | None = None
        self._draining = False
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._wake: asyncio.Event | None = None
        self._resume: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counters = {"prompt": 0, "generation": 0}
        # LoRA (off when max_loras is 0): adapters "loaded" (a directory that exists), by id.
        self.max_loras = max_loras
        self.loras: dict[int, LoRARequest] = {}
        eos = self.tokenizer.eos_token_id
        self.input_processor = InputProcessor(
            self.tokenizer,
            vocab_size,
            max_model_len,
            block_size=16,
            num_kv_blocks=kv_capacity_tokens // 16,
            eos_token_ids=[] if eos is None else [eos],
        )

    # ---------------------------------------------------------------- interface

    @property
    def is_healthy(self) -> bool:
        return self._healthy

    @property
    def is_draining(self) -> bool:
        return self._draining

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._resume = asyncio.Event()
        self._resume.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.create_task(self._run())
        self.warm = True

    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: SamplingParams,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine loop died: {self.dead_error!r}")
        if self._draining:
            raise EngineDrainingError("the engine is draining")
        # The engine's own input processor, so the app sees the engine's typed refusals, word for word.
        request = self.input_processor.process(
            request_id,
            prompt_token_ids if prompt_token_ids is not None else prompt or "",
            params,
            priority,
            prompt_text=prompt,
        )
        ids, params = request.prompt_token_ids, request.sampling_params
        if lora_request is not None and self.loras.get(lora_request.lora_int_id) != lora_request:
            raise ValueError(f"lora_request: the adapter {lora_request.lora_name!r} is not loaded")
        if len(self._waiting) >= self.max_waiting_requests:
            raise QueueFullError(
                f"the waiting queue is full (max_waiting_requests {self.max_waiting_requests})"
            )
        if sum(len(r.prompt_token_ids) for r in self._waiting) + len(ids) > self.max_waiting_tokens:
            raise QueueFullError(f"the waiting queue is full (max_waiting_tokens {self.max_waiting_tokens})")
        base_seed = params.seed if params.seed is not None else hash((request_id, time.monotonic_ns()))
        # An adapter changes the "model": its tokens differ from the base model's for the same seed.
        lora_id = 0 if lora_request is None else lora_request.lora_int_id
        seqs = [_Seq(i, random.Random(hash((base_seed, tuple(ids), i, lora_id)))) for i in range(params.n)]
        req = _Req(
            request_id,
            prompt,
            ids,
            params,
            priority,
            seqs,
            self.new_output_queue(),
            RequestMetrics(arrival_time=time.monotonic()),
            lora_request,
        )
        self._waiting.append(req)
        self._idle.clear()  # type: ignore[union-attr]
        self._wake.set()  # type: ignore[union-attr]
        return self._stream(req)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        stream = await self.add_request(request_id, text, ids, params, priority, lora_request)
        async for out in stream:
            yield out

    async def abort(self, request_id: str) -> None:
        for req in list(self._waiting) + self._running:
            if req.req_id == request_id:
                self._finish(req, "abort")

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        if not self.max_loras:
            raise ValueError("enable_lora is off: this engine serves no LoRA adapters")
        if not Path(lora_request.lora_path).is_dir():
            # The engine's wording (engine/lora/adapter.py): adapter, field, what is wrong.
            raise ValueError(
                f"LoRA adapter {lora_request.lora_name!r}: lora_path: {lora_request.lora_path!r} is not a directory"
            )
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    async def remove_lora(self, lora_int_id: int) -> bool:
        # Requests already running with it go on (they hold their LoRARequest).
        return self.loras.pop(lora_int_id, None) is not None

    def list_loras(self) -> set[int]:
        return set(self.loras)

    def _lora_counts(self, reqs: list[_Req]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in reqs:
            if r.lora_request is not None:
                counts[r.lora_request.lora_name] = counts.get(r.lora_request.lora_name, 0) + 1
        return counts

    def stats(self) -> EngineStats:
        used = sum(len(r.prompt_token_ids) + sum(len(s.token_ids) for s in r.seqs) for r in self._running)
        return EngineStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_waiting_tokens=sum(len(r.prompt_token_ids) for r in self._waiting),
            kv_cache_usage=min(used / self.kv_capacity_tokens, 1.0),
            prefix_cache_queries=self._counters["prompt"],
            prefix_cache_hits=0,
            num_preemptions=0,
            prompt_tokens_total=self._counters["prompt"],
            generation_tokens_total=self._counters["generation"],
            running_lora_adapters=self._lora_counts(self._running) if self.max_loras else None,
            waiting_lora_adapters=self._lora_counts(list(self._waiting)) if self.max_loras else None,
            max_loras=self.max_loras,
        )

    def begin_drain(self) -> None:
        self._draining = True

    async def shutdown(self, timeout: float = 0.0) -> None:
        self._draining = True
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        for req in list(self._waiting) + list(self._running):
            self._finish(req, "abort")
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # ---------------------------------------------------------------- test controls

    def pause(self) -> None:
        """Stop scheduling: new requests stay queued until resume()."""
        self._resume.clear()  # type: ignore[union-attr]

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._resume.set)  # type: ignore[union-attr]

    # ---------------------------------------------------------------- internals

    async def _stream(self, req: _Req) -> AsyncIterator[RequestOutput]:
        raise_after_first, self.raise_in_next_stream = self.raise_in_next_stream, None
        try:
            while True:
                out = await req.queue.get()
                yield out
                if raise_after_first is not None:
                    raise raise_after_first
                if out.finished:
                    return
        finally:
            if not req.finished:
                self._finish(req, "abort", notify=False)

    async def _run(self) -> None:
        try:
            while True:
                if not self._waiting and not self._running:
                    self._idle.set()  # type: ignore[union-attr]
                    self._wake.clear()  # type: ignore[union-attr]
                    await self._wake.wait()  # type: ignore[union-attr]
                    continue
                await self._resume.wait()  # type: ignore[union-attr]
                while self._waiting and len(self._running) < self.max_num_seqs:
                    req = self._waiting.popleft()
                    req.metrics.first_scheduled_time = time.monotonic()
                    self._counters["prompt"] += len(req.prompt_token_ids)
                    self._running.append(req)
                await asyncio.sleep(self.step_delay)  # the "forward pass"
                if self.die_next_step is not None:
                    exc, self.die_next_step = self.die_next_step, None
                    raise exc
                if self.fail_next_step is not None:
                    exc, self.fail_next_step = self.fail_next_step, None
                    for req in list(self._running):
                        req.error = f"{type(exc).__name__}: {exc}"
                        self._finish(req, "error")
                    continue
                for req in list(self._running):
                    self._step(req)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._healthy = False
            self.dead_error = exc
            for req in list(self._waiting) + list(self._running):
                req.error = f"the engine loop died: {type(exc).__name__}: {exc}"
                self._finish(req, "error")
            self._idle.set()  # type: ignore[union-attr]

    def _step(self, req: _Req) -> None:
        p = req.params
        limit = p.max_tokens if p.max_tokens is not None else self.max_model_len - len(req.prompt_token_ids)
        limit = min(limit, self.max_model_len - len(req.prompt_token_ids))
        for s in req.seqs:
            if s.finish_reason is not None:
                continue
            tok = s.rng.randrange(FIRST_PLAIN_TOKEN, 500)
            s.token_ids.append(tok)
            self._counters["generation"] += 1
            if p.logprobs is not None:
                pos = {tok: Logprob(-0.25, rank=1)}
                for r in range(2, p.logprobs + 1):
                    other = FIRST_PLAIN_TOKEN + (tok + r * 7) % (500 - FIRST_PLAIN_TOKEN)
                    pos.setdefault(other, Logprob(-0.25 * r, rank=r))
                s.logprobs.append(pos)
            text = self.tokenizer.decode(s.token_ids, skip_special_tokens=p.skip_special_tokens)
            for stop in p.stop or []:
                at = text.find(stop, max(0, len(s.text) - len(stop)))
                if at >= 0:
                    text = text[: at + len(stop)] if p.include_stop_str_in_output else text[:at]
                    s.finish_reason, s.stop_reason = "stop", stop
                    break
            s.text = text
            if s.finish_reason is None and tok in (p.stop_token_ids or []):
                s.finish_reason, s.stop_reason = "stop", tok
            if s.finish_reason is None and len(s.token_ids) >= limit:
                s.finish_reason = "length"
        self._publish(req)

    def _publish(self, req: _Req) -> None:
        """After a step gave `req` its tokens: its first-token time, then its end or its outputs."""
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.monotonic()
        if all(s.finish_reason is not None for s in req.seqs):
            self._finish(req, None)
        else:
            self._emit(req)

    def _emit(self, req: _Req) -> None:
        # As engine/outputs/output_processor.py: every output carries its deltas; the whole sequence
        # is on every "cumulative" output and on the finished one; "final_only" sends only that.
        kind = req.params.output_kind
        if kind == "final_only" and not req.finished:
            return
        outs = []
        for s in req.seqs:
            delta_text = s.text[s.sent_text :] if len(s.text) >= s.sent_text else ""
            delta_ids = s.token_ids[s.sent_tokens :]
            delta_logprobs = s.logprobs[s.sent_logprobs :] if req.params.logprobs is not None else None
            s.sent_text, s.sent_tokens, s.sent_logprobs = len(s.text), len(s.token_ids), len(s.logprobs)
            whole = kind == "cumulative" or s.finish_reason is not None
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=s.text if whole else "",
                    token_ids=list(s.token_ids) if whole else [],
                    logprobs=(list(s.logprobs) if whole else []) if req.params.logprobs is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    text_delta=delta_text,
                    token_ids_delta=delta_ids,
                    logprobs_delta=delta_logprobs,
                )
            )
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [{t: Logprob(-1.0, rank=1)} for t in req.prompt_token_ids[1:]]
        req.queue.put_nowait(
            RequestOutput(
                request_id=req.req_id,
                prompt=req.prompt,
                prompt_token_ids=req.prompt_token_ids,
                outputs=outs,
                finished=req.finished,
                prompt_logprobs=prompt_logprobs,
                num_cached_tokens=0,
                metrics=req.metrics,
                error=req.error,
            )
        )

    def _finish(self, req: _Req, reason: str | None, notify: bool = True) -> None:
        if req.finished:
            return
        req.finished = True
        for s in req.seqs:
            if s.finish_reason is None:
                s.finish_reason = reason or "abort"
        if req in self._running:
            self._running.remove(req)
        if req in self._waiting:
            self._waiting.remove(req)
        req.metrics.finished_time = time.monotonic()
        if notify:
            self._emit(req)
        if not self._waiting and not self._running and self._idle is not None:
            self._idle.set()
