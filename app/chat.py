"""POST /v1/chat/completions: messages rendered with the model's chat template, n, logprobs +
top_logprobs, max_tokens / max_completion_tokens (default: the rest of the context), stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import structlog
from starlette.requests import Request
from starlette.responses import Response

from app.chat_render import render_chat
from app.errors import bad_request
from app.generation import (
    ChunkFrame,
    RequestTimer,
    build_sampling_params,
    chat_logprobs,
    check_prompt_length,
    new_id,
    new_logprobs,
    sse,
    stream_response,
    submit,
    unary_response,
    usage_of,
)
from app.http import api_route, read_json
from app.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    Usage,
)
from app.sse import SSEResponse
from app.state import AppState
from app.unsupported import check_unsupported
from engine.core.sampling_params import MAX_LOGPROBS
from engine.outputs.request_output import CompletionOutput, RequestOutput


@api_route
async def create_chat_completion(request: Request) -> Response:
    state: AppState = request.app.state.weir
    arrival = time.monotonic()
    req = await read_json(request, ChatCompletionRequest, state.config.max_body_bytes)
    model = state.check_model(req.model)
    check_unsupported(req, chat=True)
    if req.max_completion_tokens is not None:
        max_tokens, max_field = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, max_field = req.max_tokens, "max_tokens"
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be in [0, {MAX_LOGPROBS}]; got {req.top_logprobs}", param="top_logprobs"
            )
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    ids = await state.encoder.run(
        render_chat, state, req.messages, req.add_generation_prompt is not False, max_tokens, max_field
    )
    check_prompt_length(state, len(ids), max_tokens, "messages", max_field)
    params = build_sampling_params(
        req,
        state,
        max_tokens=max_tokens,
        logprobs=top_n,
        field_renames={"max_tokens": max_field, "logprobs": "top_logprobs"},
    )
    rid = new_id("chatcmpl")
    structlog.contextvars.bind_contextvars(request_id=rid)
    streams = await submit(state, [rid], [(None, ids)], params, req.priority or 0, prompt_field="messages")
    timer = RequestTimer(state, arrival)
    ctx = _Ctx(state, req, rid, model, params.n, top_n)
    headers = {"X-Request-Id": rid}
    if req.stream:
        return SSEResponse(
            _stream(ctx, streams[0], timer), ping_interval=state.config.sse_keepalive, headers=headers
        )
    return await unary_response(request, state, "chat", streams, [timer], ctx.response, headers)


class _Ctx:
    def __init__(
        self, state: AppState, req: ChatCompletionRequest, rid: str, model: str, n: int, top_n: int | None
    ) -> None:
        self.state = state
        self.req = req
        self.rid = rid
        self.model = model
        self.n = n
        self.top_n = top_n
        self.created = int(time.time())
        self._frame: ChunkFrame | None = None

    def logprobs(self, o: CompletionOutput, start: int) -> ChatLogprobs | None:
        if self.top_n is None:
            return None
        ids, positions = new_logprobs(o, start)
        return ChatLogprobs(content=chat_logprobs(self.state, ids, positions, self.top_n))

    def response(self, finals: list[RequestOutput]) -> ChatCompletionResponse:
        (out,) = finals
        choices = [
            ChatChoice(
                index=o.index,
                message=ChatResponseMessage(role="assistant", content=o.text),
                logprobs=self.logprobs(o, 0),
                finish_reason=o.finish_reason,
                stop_reason=o.stop_reason,
            )
            for o in sorted(out.outputs, key=lambda o: o.index)
        ]
        return ChatCompletionResponse(
            id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage_of(finals)
        )

    def chunk(self, choice: ChatStreamChoice) -> bytes:
        if self._frame is None:
            self._frame = ChunkFrame(
                ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[])
            )
        return self._frame(choice)


def _stream(ctx: _Ctx, stream: AsyncIterator[RequestOutput], timer: RequestTimer) -> AsyncIterator[bytes]:
    sent: dict[int, int] = {}  # choice index -> tokens streamed; -1 once its finish_reason went out

    def chunks(_: int, out: RequestOutput) -> Iterator[bytes]:
        for o in out.outputs:
            start = sent.get(o.index, 0)
            if start < 0 or o.finish_reason in ("error", "abort"):
                continue
            sent[o.index] = -1 if o.finish_reason is not None else len(o.token_ids)
            logprobs = ctx.logprobs(o, start)
            if o.text_delta or o.finish_reason is not None or (logprobs is not None and logprobs.content):
                delta = DeltaMessage(content=o.text_delta) if o.text_delta else DeltaMessage()
                yield ctx.chunk(
                    ChatStreamChoice(
                        index=o.index,
                        delta=delta,
                        logprobs=logprobs,
                        finish_reason=o.finish_reason,
                        stop_reason=o.stop_reason,
                    )
                )

    def usage_chunk(usage: Usage) -> bytes:
        return sse(
            ChatCompletionChunk(id=ctx.rid, created=ctx.created, model=ctx.model, choices=[], usage=usage)
        )

    opts = ctx.req.stream_options
    return stream_response(
        ctx.state,
        "chat",
        [stream],
        [timer],
        chunks,
        usage_chunk if opts is not None and opts.include_usage else None,
        head=(
            ctx.chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            for i in range(ctx.n)
        ),
    )
