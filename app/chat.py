"""POST /v1/chat/completions: messages rendered with the model's chat template, n, logprobs +
top_logprobs, max_tokens / max_completion_tokens (default: the rest of the context), stream.

The route reads top to bottom: parse, prompt + SamplingParams, submit, write the response. Below it,
`ChatResponseShape` shapes the engine's outputs as chat chunks or one chat response.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import structlog
from starlette.requests import Request
from starlette.responses import Response

from app.chat_render import render_chat
from app.errors import bad_request
from app.http import api_route, read_json
from app.logprobs_format import chat_logprobs
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
from app.request_mapping import FieldNames, sampling_params
from app.request_timer import RequestTimer
from app.response_writer import respond
from app.sse import ChunkFrame, sse
from app.state import AppState
from app.submission import new_id, submit
from app.unsupported import check_unsupported
from engine.core.sampling_params import MAX_LOGPROBS
from engine.outputs.request_output import PositionLogprobs, RequestOutput


@api_route
async def create_chat_completion(request: Request) -> Response:
    state: AppState = request.app.state.weir
    arrival = time.monotonic()
    # 1. Parse.
    req = await read_json(request, ChatCompletionRequest, state.config.max_body_bytes)
    model, lora = state.resolve_model(req.model)
    check_unsupported(req, chat=True)
    if req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            # One of them would go unused: which was meant is the caller's to say.
            raise bad_request(
                f"max_tokens ({req.max_tokens}) and max_completion_tokens ({req.max_completion_tokens}) "
                "disagree; set one of them (max_tokens is the deprecated name)",
                param="max_tokens",
            )
        max_tokens, max_field = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, max_field = req.max_tokens, "max_tokens"
    # The engine's logprobs is chat's top_logprobs when the request set that count; otherwise it came
    # from `logprobs: true` alone, and naming top_logprobs would point at a field the client never sent.
    renames = {"logprobs": "top_logprobs"} if req.top_logprobs is not None else {}
    names = FieldNames(prompt="messages", max_tokens=max_field, renames=renames)
    top_n = _top_logprobs(req)
    # 2. The prompt (rendered and tokenized off the event loop) and the SamplingParams.
    ids = await state.encoder.run(
        render_chat, state, req.messages, req.add_generation_prompt is not False, max_tokens, max_field
    )
    params = sampling_params(req, state, names, max_tokens=max_tokens, logprobs=top_n)
    # 3. Submit to the engine, which validates the request against the model.
    rid = new_id("chatcmpl")
    structlog.contextvars.bind_contextvars(request_id=rid)
    streams = await submit(state, [rid], [(None, ids)], params, req.priority or 0, names, lora)
    # 4. Write the response: streamed or collected.
    opts = req.stream_options
    return await respond(
        request,
        state,
        streams,
        [RequestTimer(state, arrival, lora)],
        ChatResponseShape(state, rid, model, params.n, top_n),
        stream=bool(req.stream),
        include_usage=opts is not None and bool(opts.include_usage),
        headers={"X-Request-Id": rid},
    )


def _top_logprobs(req: ChatCompletionRequest) -> int | None:
    """Chat's logprobs (a bool) + top_logprobs (a count) as the engine's one count, None for none.
    The range is checked here too, so the message names top_logprobs rather than the engine's field."""
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be in [0, {MAX_LOGPROBS}]; got {req.top_logprobs}", param="top_logprobs"
            )
    return (req.top_logprobs or 0) if req.logprobs else None


class ChatResponseShape:
    """One chat request's chunks (from each output's deltas) and whole response (from the finals)."""

    endpoint = "chat"

    def __init__(self, state: AppState, rid: str, model: str, n: int, top_n: int | None) -> None:
        self.state = state
        self.rid = rid
        self.model = model
        self.n = n
        self.top_n = top_n
        self.created = int(time.time())
        self._frame: ChunkFrame | None = None
        self._done: set[int] = set()  # choices whose finish_reason went out

    def _logprobs(
        self, token_ids: Sequence[int], positions: Sequence[PositionLogprobs] | None
    ) -> ChatLogprobs | None:
        if self.top_n is None:
            return None
        return ChatLogprobs(content=chat_logprobs(self.state, token_ids, positions or (), self.top_n))

    def _chunk(self, choice: ChatStreamChoice) -> bytes:
        if self._frame is None:
            self._frame = ChunkFrame(
                ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[])
            )
        return self._frame(choice)

    def head(self) -> Iterator[bytes]:
        for i in range(self.n):
            yield self._chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))

    def chunks(self, p: int, out: RequestOutput) -> Iterator[bytes]:
        done = self._done
        for o in out.outputs:
            if o.index in done or o.finish_reason in ("error", "abort"):
                continue
            if o.finish_reason is not None:
                done.add(o.index)
            logprobs = self._logprobs(o.token_ids_delta, o.logprobs_delta)
            if o.text_delta or o.finish_reason is not None or (logprobs is not None and logprobs.content):
                delta = DeltaMessage(content=o.text_delta) if o.text_delta else DeltaMessage()
                yield self._chunk(
                    ChatStreamChoice(
                        index=o.index,
                        delta=delta,
                        logprobs=logprobs,
                        finish_reason=o.finish_reason,
                        stop_reason=o.stop_reason,
                    )
                )

    def usage_chunk(self, usage: Usage) -> bytes:
        return sse(
            ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[], usage=usage)
        )

    def response(self, finals: list[RequestOutput], usage: Usage) -> ChatCompletionResponse:
        (out,) = finals
        choices = [
            ChatChoice(
                index=o.index,
                message=ChatResponseMessage(role="assistant", content=o.text),
                logprobs=self._logprobs(o.token_ids, o.logprobs),
                finish_reason=o.finish_reason,
                stop_reason=o.stop_reason,
            )
            for o in sorted(out.outputs, key=lambda o: o.index)
        ]
        return ChatCompletionResponse(
            id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage
        )
