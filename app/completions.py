"""POST /v1/completions: prompt as str | list[str] | list[int] | list[list[int]], echo, logprobs, n,
best_of, stream. A list of prompts is one engine request per prompt; choice i*n + j is prompt i's
j-th sequence.

The route reads top to bottom: parse, prompts + SamplingParams, submit, write the response. Below it,
`CompletionResponseShape` shapes the engine's outputs as completion chunks or one response.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import structlog
from starlette.requests import Request
from starlette.responses import Response

from app.errors import bad_request
from app.http import api_route, read_json
from app.logprobs_format import completion_logprobs, concat_logprobs
from app.prompt_processing import Prompt, parse_prompts
from app.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from app.request_mapping import COMPLETION_FIELDS, sampling_params
from app.request_timer import RequestTimer
from app.response_writer import respond
from app.sse import ChunkFrame, sse
from app.state import AppState
from app.submission import new_id, submit
from app.unsupported import check_unsupported
from engine.outputs.request_output import CompletionOutput, RequestOutput


@api_route
async def create_completion(request: Request) -> Response:
    state: AppState = request.app.state.weir
    arrival = time.monotonic()
    # 1. Parse.
    req = await read_json(request, CompletionRequest, state.config.max_body_bytes)
    model, lora = state.resolve_model(req.model)
    check_unsupported(req, chat=False)
    if req.suffix is not None:
        raise bad_request(
            "suffix is not supported: weir has no fill-in-the-middle mode", param="suffix", code="unsupported"
        )
    # 2. The prompts (text tokenized off the event loop) and the SamplingParams.
    prompts = await parse_prompts(state, req.prompt, req.max_tokens)
    echo = bool(req.echo)
    params = sampling_params(
        req,
        state,
        COMPLETION_FIELDS,
        max_tokens=req.max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if echo and req.logprobs is not None else None,
        best_of=req.best_of,
    )
    if req.stream and params.best_of is not None and params.best_of > params.n:
        # As vLLM: which n of the best_of samples are returned is known only when all have finished.
        raise bad_request(
            f"best_of ({params.best_of}) greater than n ({params.n}) is not supported with stream: "
            "the n best samples are known only when all have finished",
            param="best_of",
        )
    # 3. Submit to the engine, which validates each prompt against the model.
    rid = new_id("cmpl")
    structlog.contextvars.bind_contextvars(request_id=rid)
    request_ids = [f"{rid}-{i}" for i in range(len(prompts))]
    streams = await submit(state, request_ids, prompts, params, req.priority or 0, COMPLETION_FIELDS, lora)
    # 4. Write the response: streamed or collected.
    opts = req.stream_options
    return await respond(
        request,
        state,
        streams,
        [RequestTimer(state, arrival, lora) for _ in prompts],
        CompletionResponseShape(state, rid, model, prompts, params.n, echo, req.logprobs is not None),
        stream=bool(req.stream),
        include_usage=opts is not None and bool(opts.include_usage),
        headers={"X-Request-Id": rid},
    )


class CompletionResponseShape:
    """One completions request's chunks (from each output's deltas) and whole response (from the
    finals)."""

    endpoint = "completions"

    def __init__(
        self,
        state: AppState,
        rid: str,
        model: str,
        prompts: list[Prompt],
        n: int,
        echo: bool,
        logprobs: bool,
    ) -> None:
        self.state = state
        self.rid = rid
        self.model = model
        self.prompts = prompts
        self.n = n
        self.echo = echo
        self.logprobs = logprobs
        self.created = int(time.time())
        self._frame: ChunkFrame | None = None
        self._started: set[int] = set()  # choice indexes with an output seen
        self._done: set[int] = set()  # choice indexes whose finish_reason went out
        self._offsets: dict[int, int] = {}  # choice index -> text offset of its next logprob

    def _prompt_text(self, p: int) -> str:
        text, ids = self.prompts[p]
        return text if text is not None else self.state.tokenizer.decode(ids)

    def _echo_logprobs(self, out: RequestOutput) -> tuple[CompletionLogprobs, int]:
        return completion_logprobs(self.state, out.prompt_token_ids, out.prompt_logprobs or [], 0)

    def response(self, finals: list[RequestOutput], usage: Usage) -> CompletionResponse:
        choices = []
        for p, out in enumerate(finals):
            prefix = self._prompt_text(p) if self.echo else ""
            for o in out.outputs:
                logprobs = None
                if self.logprobs:
                    offset = 0
                    if self.echo:
                        logprobs, offset = self._echo_logprobs(out)
                    gen, _ = completion_logprobs(self.state, o.token_ids, o.logprobs or [], offset)
                    logprobs = gen if logprobs is None else concat_logprobs(logprobs, gen)
                choices.append(
                    CompletionChoice(
                        index=p * self.n + o.index,
                        text=prefix + o.text,
                        logprobs=logprobs,
                        finish_reason=o.finish_reason,
                        stop_reason=o.stop_reason,
                    )
                )
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(
            id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def head(self) -> Iterator[bytes]:
        return iter(())

    def chunks(self, p: int, out: RequestOutput) -> Iterator[bytes]:
        for o in out.outputs:
            choice = self._stream_choice(p, out, o)
            if choice is not None:
                yield self._chunk(choice)

    def _stream_choice(self, p: int, out: RequestOutput, o: CompletionOutput) -> CompletionChoice | None:
        """The chunk choice for what `o` adds; None when there is nothing to send."""
        idx = p * self.n + o.index
        if o.finish_reason in ("error", "abort") or idx in self._done:
            return None
        first = idx not in self._started
        self._started.add(idx)
        if o.finish_reason is not None:
            self._done.add(idx)  # later outputs of the request skip it
        text = o.text_delta
        logprobs = None
        if first and self.echo:
            text = self._prompt_text(p) + text
        if self.logprobs:
            offset = self._offsets.get(idx, 0)
            if first and self.echo:
                logprobs, offset = self._echo_logprobs(out)
            gen, self._offsets[idx] = completion_logprobs(
                self.state, o.token_ids_delta, o.logprobs_delta or [], offset
            )
            logprobs = gen if logprobs is None else concat_logprobs(logprobs, gen)
        if not text and o.finish_reason is None and not (logprobs is not None and logprobs.tokens):
            return None
        return CompletionChoice(
            index=idx, text=text, logprobs=logprobs, finish_reason=o.finish_reason, stop_reason=o.stop_reason
        )

    def _chunk(self, choice: CompletionChoice) -> bytes:
        if self._frame is None:
            self._frame = ChunkFrame(
                CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=[])
            )
        return self._frame(choice)

    def usage_chunk(self, usage: Usage) -> bytes:
        return sse(
            CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=[], usage=usage)
        )
