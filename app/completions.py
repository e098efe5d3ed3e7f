"""POST /v1/completions: prompt as str | list[str] | list[int] | list[list[int]], echo, logprobs, n,
best_of, stream. A list of prompts is one engine request per prompt; choice i*n + j is prompt i's
j-th sequence.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response

from app.errors import bad_request
from app.generation import (
    ChunkFrame,
    RequestTimer,
    build_sampling_params,
    check_prompt_chars,
    check_prompt_length,
    check_token_ids,
    completion_logprobs,
    new_id,
    new_logprobs,
    sse,
    stream_response,
    submit,
    unary_response,
    usage_of,
)
from app.http import api_route, read_json
from app.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from app.sse import SSEResponse
from app.state import AppState
from app.unsupported import check_unsupported
from engine.outputs.request_output import CompletionOutput, RequestOutput

MAX_PROMPTS = 256

_PROMPT_SHAPE = (
    "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
)

Prompt = tuple[str | None, list[int]]


# JSON decodes to exact types (a JSON bool is a bool, never an int), so a prompt's shape is checked by
# type identity, in C: `_INT.issuperset(map(type, ids))` takes microseconds for S1's 1024-token prompts,
# where a per-element isinstance loop took a good part of the request's set-up time.
_INT, _STR, _LIST = frozenset({int}), frozenset({str}), frozenset({list})


async def parse_prompts(state: AppState, raw: Any, max_tokens: int | None) -> list[Prompt]:
    """The prompts as (text, token ids); text prompts are tokenized off the event loop, once their
    length in characters has not already proved them too long."""
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list):
        if not raw:
            raise bad_request("prompt must not be empty", param="prompt")
        if type(raw[0]) is int and (ids := state.valid_token_ids(raw)) is not None:
            return [(None, ids)]  # S1's shape, the hot one
        if _INT.issuperset(map(type, raw)):
            items = [raw]
        elif _STR.issuperset(map(type, raw)) or _LIST.issuperset(map(type, raw)):
            items = raw
        else:
            raise bad_request(_PROMPT_SHAPE, param="prompt")
    else:
        raise bad_request(_PROMPT_SHAPE, param="prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"prompt may hold at most {MAX_PROMPTS} prompts; got {len(items)}", param="prompt")
    prompts: list[Prompt] = []
    texts: list[str] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("prompt must not be empty", param="prompt")
            check_prompt_chars(state, item, max_tokens, "prompt", "max_tokens")
            texts.append(item)
            prompts.append((item, []))
            continue
        ids = state.valid_token_ids(item)
        if ids is None:  # the checks below name what is wrong
            if not _INT.issuperset(map(type, item)):
                raise bad_request(_PROMPT_SHAPE, param="prompt")
            if not item:
                raise bad_request("prompt must not be empty", param="prompt")
            check_token_ids(state, item, "prompt")
            ids = list(item)
        prompts.append((None, ids))
    if texts:
        encoder = state.encoder
        encoded = iter(await encoder.run(lambda: [encoder.encode(t) for t in texts]))
        prompts = [(text, next(encoded)) if text is not None else (None, ids) for text, ids in prompts]
    return prompts


@api_route
async def create_completion(request: Request) -> Response:
    state: AppState = request.app.state.weir
    arrival = time.monotonic()
    req = await read_json(request, CompletionRequest, state.config.max_body_bytes)
    model = state.check_model(req.model)
    check_unsupported(req, chat=False)
    if req.suffix is not None:
        raise bad_request(
            "suffix is not supported: weir has no fill-in-the-middle mode", param="suffix", code="unsupported"
        )
    prompts = await parse_prompts(state, req.prompt, req.max_tokens)
    for _, ids in prompts:
        check_prompt_length(state, len(ids), req.max_tokens, "prompt", "max_tokens")
    echo = bool(req.echo)
    params = build_sampling_params(
        req,
        state,
        max_tokens=req.max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if echo and req.logprobs is not None else None,
        best_of=req.best_of,
    )
    rid = new_id("cmpl")
    structlog.contextvars.bind_contextvars(request_id=rid)
    streams = await submit(
        state, [f"{rid}-{i}" for i in range(len(prompts))], prompts, params, req.priority or 0
    )
    timers = [RequestTimer(state, arrival) for _ in prompts]
    ctx = _Ctx(state, req, rid, model, prompts, params.n, echo)
    headers = {"X-Request-Id": rid}
    if req.stream:
        return SSEResponse(
            _stream(ctx, streams, timers), ping_interval=state.config.sse_keepalive, headers=headers
        )

    return await unary_response(request, state, "completions", streams, timers, ctx.response, headers)


def _concat(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        text_offset=a.text_offset + b.text_offset,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        tokens=a.tokens + b.tokens,
        top_logprobs=a.top_logprobs + b.top_logprobs,
    )


class _Ctx:
    """One completions request as its response builder needs it."""

    def __init__(
        self,
        state: AppState,
        req: CompletionRequest,
        rid: str,
        model: str,
        prompts: list[Prompt],
        n: int,
        echo: bool,
    ) -> None:
        self.state = state
        self.req = req
        self.rid = rid
        self.model = model
        self.prompts = prompts
        self.n = n
        self.echo = echo
        self.created = int(time.time())
        self._frame: ChunkFrame | None = None

    def prompt_text(self, p: int) -> str:
        text, ids = self.prompts[p]
        return text if text is not None else self.state.tokenizer.decode(ids)

    def echo_logprobs(self, out: RequestOutput) -> tuple[CompletionLogprobs, int]:
        return completion_logprobs(self.state, out.prompt_token_ids, out.prompt_logprobs or [], 0)

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for p, out in enumerate(finals):
            prefix = self.prompt_text(p) if self.echo else ""
            for o in out.outputs:
                logprobs = None
                if self.req.logprobs is not None:
                    offset = 0
                    if self.echo:
                        logprobs, offset = self.echo_logprobs(out)
                    gen, _ = completion_logprobs(self.state, o.token_ids, o.logprobs or [], offset)
                    logprobs = gen if logprobs is None else _concat(logprobs, gen)
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
            id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage_of(finals)
        )

    def stream_choice(
        self, p: int, out: RequestOutput, o: CompletionOutput, sent: dict[int, int], offsets: dict[int, int]
    ) -> CompletionChoice | None:
        """The chunk choice for what `o` added since the last one; None when there is nothing to send."""
        idx = p * self.n + o.index
        first = idx not in sent
        if o.finish_reason in ("error", "abort") or (not first and sent[idx] < 0):
            return None
        text = o.text_delta
        logprobs = None
        if first and self.echo:
            text = self.prompt_text(p) + text
        if self.req.logprobs is not None:
            offset = offsets.get(idx, 0)
            if first and self.echo:
                logprobs, offset = self.echo_logprobs(out)
            ids, positions = new_logprobs(o, 0 if first else sent[idx])
            gen, offsets[idx] = completion_logprobs(self.state, ids, positions, offset)
            logprobs = gen if logprobs is None else _concat(logprobs, gen)
        # -1 marks a finished choice, so later outputs of the request skip it.
        sent[idx] = -1 if o.finish_reason is not None else len(o.token_ids)
        if not text and o.finish_reason is None and not (logprobs is not None and logprobs.tokens):
            return None
        return CompletionChoice(
            index=idx, text=text, logprobs=logprobs, finish_reason=o.finish_reason, stop_reason=o.stop_reason
        )

    def chunk(self, choice: CompletionChoice) -> bytes:
        if self._frame is None:
            self._frame = ChunkFrame(
                CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=[])
            )
        return self._frame(choice)


def _stream(
    ctx: _Ctx, streams: Sequence[AsyncIterator[RequestOutput]], timers: list[RequestTimer]
) -> AsyncIterator[bytes]:
    sent: dict[int, int] = {}  # choice index -> tokens streamed
    offsets: dict[int, int] = {}  # choice index -> text offset (logprobs)

    def chunks(p: int, out: RequestOutput) -> Iterator[bytes]:
        for o in out.outputs:
            choice = ctx.stream_choice(p, out, o, sent, offsets)
            if choice is not None:
                yield ctx.chunk(choice)

    def usage_chunk(usage: Usage) -> bytes:
        return sse(
            CompletionResponse(id=ctx.rid, created=ctx.created, model=ctx.model, choices=[], usage=usage)
        )

    opts = ctx.req.stream_options
    return stream_response(
        ctx.state,
        "completions",
        streams,
        timers,
        chunks,
        usage_chunk if opts is not None and opts.include_usage else None,
    )
