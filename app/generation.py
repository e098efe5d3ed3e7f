"""What /v1/completions and /v1/chat/completions share: request -> SamplingParams, submitting to the
engine, per-request timings and metrics, logprob formatting and SSE framing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import aclosing
from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app.errors import APIError, bad_request, error_from_engine, error_from_value_error, service_unavailable
from app.http import ClientGone, unless_disconnected
from app.logging import get_logger
from app.protocol import (
    ChatLogprobToken,
    CompletionLogprobs,
    PromptTokensDetails,
    SamplingRequest,
    TopLogprob,
    Usage,
)
from app.state import AppState
from engine.core.sampling_params import SamplingParams
from engine.outputs.request_output import CompletionOutput, Logprob, RequestOutput

log = get_logger("weir.app")
encoder = msgspec.json.Encoder()

DONE = b"data: [DONE]\n\n"

# Fields of the request whose names may lead an engine ValueError ("top_p must be in ...").
SAMPLING_FIELDS = frozenset(
    {
        "n",
        "best_of",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "seed",
        "stop",
        "stop_token_ids",
        "min_tokens",
        "max_tokens",
        "logprobs",
        "prompt_logprobs",
        "prompt",
        "priority",
    }
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj: Any) -> bytes:
    return b"data: " + encoder.encode(obj) + b"\n\n"


class ChunkFrame:
    """Frames one stream chunk as `data: {...}\n\n`, with the fields every chunk of a response shares
    (id, created, model, object) encoded once per response: per chunk only the choice is encoded.

    Built from the response's chunk with no choices; `frame(choice)` is byte for byte
    `sse(<that chunk with choices=[choice]>)`. The split is safe: a JSON string cannot hold the
    unescaped `"choices":[]` that marks it.
    """

    __slots__ = ("head", "tail")

    def __init__(self, empty_chunk: Any) -> None:
        body = encoder.encode(empty_chunk)
        head, marker, rest = body.partition(b'"choices":[]')
        if not marker:
            raise ValueError(f"not a chunk with an empty choices list: {body[:200]!r}")
        self.head = b"data: " + head + b'"choices":['
        self.tail = b"]" + rest + b"\n\n"

    def __call__(self, choice: Any) -> bytes:
        return b"".join((self.head, encoder.encode(choice), self.tail))


def sse_error(err: APIError) -> bytes:
    return sse(err.body())


# ---------------------------------------------------------------- request -> engine


def build_sampling_params(
    req: SamplingRequest,
    state: AppState,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    best_of: int | None = None,
    field_renames: dict[str, str] | None = None,
) -> SamplingParams:
    """Validated SamplingParams; a 400 naming the request field for every bad value."""
    kw: dict[str, Any] = dict(state.sampling_defaults)
    for name in (
        "n",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
    ):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.logit_bias:
        bias: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise bad_request(
                    f"logit_bias keys must be token ids; got {key!r}", param="logit_bias"
                ) from None
        kw["logit_bias"] = bias
    kw["max_tokens"] = max_tokens
    kw["logprobs"] = logprobs
    kw["prompt_logprobs"] = prompt_logprobs
    if best_of is not None:
        kw["best_of"] = best_of
    try:
        params = SamplingParams(**kw)
        params.validate_against_vocab(state.vocab_size)
    except ValueError as exc:
        err = error_from_value_error(exc, SAMPLING_FIELDS)
        if err.param and field_renames and err.param in field_renames:
            err.param = field_renames[err.param]
        raise err from None
    return params


def check_prompt_length(
    state: AppState, num_prompt_tokens: int, max_tokens: int | None, prompt_field: str, max_tokens_field: str
) -> None:
    """400 with both numbers when prompt + max_tokens does not fit the context."""
    limit = state.max_model_len
    if num_prompt_tokens >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, the {prompt_field} has "
            f"{num_prompt_tokens} tokens, which leaves no room for the completion. Please shorten the "
            f"{prompt_field}.",
            param=prompt_field,
            code="context_length_exceeded",
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {prompt_field}, "
            f"{max_tokens} in {max_tokens_field}). Please reduce the length of the {prompt_field} or "
            f"{max_tokens_field}.",
            param=max_tokens_field,
            code="context_length_exceeded",
        )


def check_prompt_chars(
    state: AppState, text: str, max_tokens: int | None, prompt_field: str, max_tokens_field: str
) -> None:
    """400 before tokenizing when the text's length in characters already proves it cannot fit
    (app/prompt_encoder.py: a token stands for at most `max_chars_per_token` characters)."""
    at_least = state.encoder.min_tokens(text)
    limit = state.max_model_len
    if at_least < limit and (max_tokens is None or at_least + max_tokens <= limit):
        return
    why = (
        f"the {prompt_field} has {len(text)} characters, so at least {at_least} tokens (no token of this "
        f"model is longer than {state.encoder.max_chars_per_token} characters)"
    )
    if at_least >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, {why}, which leaves no room "
            f"for the completion. Please shorten the {prompt_field}.",
            param=prompt_field,
            code="context_length_exceeded",
        )
    raise APIError(
        400,
        f"This model's maximum context length is {limit} tokens. However, {why}, and {max_tokens_field} "
        f"is {max_tokens}. Please reduce the length of the {prompt_field} or {max_tokens_field}.",
        param=max_tokens_field,
        code="context_length_exceeded",
    )


def check_token_ids(state: AppState, token_ids: Sequence[int], field: str) -> None:
    # min/max run in C; the loop only finds which id to name once one is out of range.
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < state.vocab_size):
        return
    for t in token_ids:
        if not 0 <= t < state.vocab_size:
            raise bad_request(
                f"{field} contains token id {t}, outside the vocabulary [0, {state.vocab_size})", param=field
            )


def check_queue_bounds(state: AppState, prompt_lens: Sequence[int], n: int, prompt_field: str) -> None:
    """400, naming the bound, for a request larger than the waiting queue itself: it could never be
    admitted, so a 429 (retry later) would have well-behaved clients retry forever."""
    max_requests, max_tokens = state.queue_bounds
    sequences = len(prompt_lens) * n
    if sequences > max_requests:
        raise APIError(
            400,
            f"This request needs {sequences} places in the waiting queue ({len(prompt_lens)} prompt(s) x "
            f"n={n}) but the server's whole queue holds {max_requests} (max_waiting_requests), so it "
            "could never be admitted. Send fewer prompts or a smaller n.",
            param="n" if n > 1 else prompt_field,
            code="exceeds_queue_bound",
        )
    tokens = sum(prompt_lens) * n
    if tokens > max_tokens:
        raise APIError(
            400,
            f"This request needs {tokens} prompt tokens in the waiting queue ({sum(prompt_lens)} prompt "
            f"tokens x n={n}) but the server's whole queue holds {max_tokens} (max_waiting_tokens), so it "
            f"could never be admitted. Send a shorter {prompt_field} or a smaller n.",
            param=prompt_field,
            code="exceeds_queue_bound",
        )


async def submit(
    state: AppState,
    request_ids: Sequence[str],
    prompts: Sequence[tuple[str | None, list[int]]],
    params: SamplingParams,
    priority: int,
    prompt_field: str = "prompt",
) -> list[AsyncIterator[RequestOutput]]:
    """One engine request per prompt; all or none: on a refusal the ones already added are aborted."""
    if state.draining:
        raise service_unavailable("The server is shutting down and takes no new requests.", "draining")
    check_queue_bounds(state, [len(ids) for _, ids in prompts], params.n, prompt_field)
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        for rid, (text, token_ids) in zip(request_ids, prompts, strict=True):
            streams.append(await state.engine.add_request(rid, text, token_ids, params, priority))
    except BaseException as exc:
        await close_streams(streams)
        if isinstance(exc, ValueError):
            err = error_from_value_error(exc, SAMPLING_FIELDS)
            if err.param == "prompt":
                err.param = prompt_field
            raise err from None
        if isinstance(exc, Exception) and (err := error_from_engine(exc)) is not None:
            raise err from None
        raise
    return streams


async def close_streams(streams: Sequence[Any]) -> None:
    """Abort the streams' requests (frees their KV blocks), even inside a cancelled scope."""
    with anyio.CancelScope(shield=True):
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.warning("closing an engine stream failed", exc_info=True)


async def merge(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several engine streams, as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
        else:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------- outcomes


def failure(out: RequestOutput, draining: bool) -> APIError | None:
    """The error a finished output stands for (a failed forward pass, or aborted by shutdown)."""
    reasons = {o.finish_reason for o in out.outputs}
    if out.error or "error" in reasons:
        return APIError(
            500,
            f"The request failed in the engine: {out.error or 'unknown error'}",
            type="server_error",
            code="engine_error",
        )
    if "abort" in reasons:
        if draining:
            return APIError(
                503,
                "The server is shutting down; the request was aborted after the shutdown timeout.",
                type="server_error",
                code="draining",
            )
        return APIError(503, "The request was aborted by the server.", type="server_error", code="aborted")
    return None


def stream_exception_error(exc: Exception) -> APIError:
    err = error_from_engine(exc)
    if err is not None:
        return err
    log.error("engine stream raised", exc_info=exc)
    return APIError(
        500,
        "Internal server error; the server logged the details.",
        type="server_error",
        code="internal_error",
    )


def usage_of(outs: Sequence[RequestOutput | None]) -> Usage:
    prompt = completion = cached = 0
    for out in outs:
        if out is None:
            continue
        prompt += len(out.prompt_token_ids)
        cached += max(out.num_cached_tokens or 0, 0)
        completion += sum(len(o.token_ids) for o in out.outputs)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


class RequestTimer:
    """Timings of one engine request, observed into the metrics as it streams and when it ends."""

    __slots__ = ("state", "arrival", "first_token", "last_token", "last_out")

    def __init__(self, state: AppState, arrival: float) -> None:
        self.state = state
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.last_out: RequestOutput | None = None

    def on_output(self, out: RequestOutput) -> None:
        self.last_out = out
        for o in out.outputs:  # a plain loop: this runs once per streamed token
            if o.token_ids_delta:
                break
        else:
            return
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
            self.state.metrics.ttft.observe(now - self.arrival)
        else:
            self.state.metrics.itl.observe(now - self.last_token)  # type: ignore[operator]
        self.last_token = now

    def finish(self) -> dict[str, Any]:
        """Observe the end-of-request series; returns the numbers for the request's log line."""
        m = self.state.metrics
        now = time.monotonic()
        out = self.last_out
        e2e = now - self.arrival
        m.e2e.observe(e2e)
        info: dict[str, Any] = {"e2e_s": round(e2e, 4)}
        if self.first_token is not None:
            info["ttft_s"] = round(self.first_token - self.arrival, 4)
        if out is None:
            return info
        m.prompt_tokens.observe(len(out.prompt_token_ids))
        m.generation_tokens.observe(sum(len(o.token_ids) for o in out.outputs))
        for o in out.outputs:
            m.finished(o.finish_reason or "abort")
        rm = out.metrics
        if rm is not None and rm.first_scheduled_time is not None:
            queue = max(rm.first_scheduled_time - rm.arrival_time, 0.0)
            m.queue_time.observe(queue)
            info["queue_s"] = round(queue, 4)
        return info


def log_finished(
    endpoint: str, status: int, timers: Sequence[RequestTimer], stream: bool, **extra: Any
) -> None:
    """The one line per request: timings and token counts."""
    infos = [t.finish() for t in timers]
    outs = [t.last_out for t in timers]
    usage = usage_of(outs)
    fields: dict[str, Any] = {
        "endpoint": endpoint,
        "status": status,
        "stream": stream,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0,
        "finish_reasons": sorted({o.finish_reason or "abort" for out in outs if out for o in out.outputs}),
    }
    for key in ("queue_s", "ttft_s"):
        values = [i[key] for i in infos if key in i]
        if values:
            fields[key] = max(values) if key == "queue_s" else min(values)
    fields["e2e_s"] = max((i["e2e_s"] for i in infos), default=0.0)
    log.info("request finished", **fields, **extra)


# ---------------------------------------------------------------- logprobs


def _ranked(position: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(
        position.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob)
    )


def _text(state: AppState, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return state.token_text(token_id)


def completion_logprobs(
    state: AppState,
    token_ids: Sequence[int],
    positions: Sequence[dict[int, Logprob] | None],
    text_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """Legacy completions logprobs for `token_ids`; returns it and the text offset after it."""
    result = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    for tid, pos in zip(token_ids, positions, strict=False):
        lp = pos.get(tid) if pos else None
        text = _text(state, tid, lp)
        result.tokens.append(text)
        result.token_logprobs.append(lp.logprob if lp is not None else None)
        result.top_logprobs.append(
            {_text(state, t, p): p.logprob for t, p in _ranked(pos)} if pos is not None else None
        )
        result.text_offset.append(text_offset)
        text_offset += len(text)
    for tid in token_ids[len(positions) :]:  # no logprobs for these (prompt without prompt_logprobs)
        text = state.token_text(tid)
        result.tokens.append(text)
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result, text_offset


def chat_logprobs(
    state: AppState, token_ids: Sequence[int], positions: Sequence[dict[int, Logprob]], top_n: int
) -> list[ChatLogprobToken]:
    out = []
    for tid, pos in zip(token_ids, positions, strict=False):
        lp = pos.get(tid)
        text = _text(state, tid, lp)
        top = [
            TopLogprob(token=(t := _text(state, k, p)), logprob=p.logprob, bytes=list(t.encode()))
            for k, p in _ranked(pos)[:top_n]
        ]
        out.append(
            ChatLogprobToken(
                token=text,
                logprob=lp.logprob if lp is not None else -9999.0,
                bytes=list(text.encode()),
                top_logprobs=top,
            )
        )
    return out


def new_logprobs(o: CompletionOutput, sent: int) -> tuple[list[int], list[dict[int, Logprob]]]:
    """Token ids and logprob positions of `o` not streamed yet (after the first `sent` tokens)."""
    ids = o.token_ids[sent:]
    positions = (o.logprobs or [])[sent : sent + len(ids)]
    return ids, positions


# ---------------------------------------------------------------- non-streamed responses


async def collect(
    streams: Sequence[AsyncIterator[RequestOutput]], timers: Sequence[RequestTimer]
) -> list[RequestOutput]:
    async with aclosing(merge(streams)) as outs:
        async for i, out in outs:
            timers[i].on_output(out)
    return [t.last_out for t in timers]  # type: ignore[misc]


async def unary_response(
    request: Request,
    state: AppState,
    endpoint: str,
    streams: Sequence[AsyncIterator[RequestOutput]],
    timers: Sequence[RequestTimer],
    build: Callable[[list[RequestOutput]], Any],
    headers: dict[str, str],
) -> Response:
    """Wait for every stream to finish (aborting them if the client leaves) and answer in one body."""
    status = 500
    try:
        try:
            finals = await unless_disconnected(request, collect(streams, timers))
        except ClientGone:
            status = 499
            return Response(status_code=499)
        except APIError as exc:
            status = exc.status
            raise
        except Exception as exc:
            err = stream_exception_error(exc)
            status = err.status
            raise err from None
        for out in finals:
            if out is None or not out.finished:
                raise RuntimeError("engine stream ended without a finished output")
            if (err := failure(out, state.draining)) is not None:
                status = err.status
                raise err
        body = encoder.encode(build(finals))
        status = 200
        return Response(body, media_type="application/json", headers=headers)
    finally:
        await close_streams(streams)
        log_finished(endpoint, status, timers, stream=False)


# ---------------------------------------------------------------- streamed responses


async def stream_response(
    state: AppState,
    endpoint: str,
    streams: Sequence[AsyncIterator[RequestOutput]],
    timers: Sequence[RequestTimer],
    chunks: Callable[[int, RequestOutput], Iterator[bytes]],
    usage_chunk: Callable[[Usage], bytes] | None,
    head: Iterable[bytes] = (),
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed request: `head`, then `chunks(stream index, output)` for each output as
    it comes, then an error event or (with `usage_chunk`) the usage chunk, then [DONE]. The streams are
    closed and the request logged however it ends (status 499 when the client went away)."""
    status = 499  # unless it ends otherwise: the client went away
    try:
        for b in head:
            yield b
        err: APIError | None = None
        if len(streams) == 1:
            # The common case, once per token: read the engine stream itself, without merge()'s layer.
            # The finally below closes it however the loop ends.
            on_output = timers[0].on_output
            async for out in streams[0]:
                on_output(out)
                for b in chunks(0, out):
                    yield b
                if out.finished and (err := failure(out, state.draining)) is not None:
                    break
        else:
            async with aclosing(merge(streams)) as outputs:
                async for p, out in outputs:
                    timers[p].on_output(out)
                    for b in chunks(p, out):
                        yield b
                    if out.finished and (err := failure(out, state.draining)) is not None:
                        break
        if err is not None:
            status = err.status
            yield sse_error(err)
        else:
            status = 200
            if usage_chunk is not None:
                yield usage_chunk(usage_of([t.last_out for t in timers]))
        yield DONE
    except Exception as exc:
        err = stream_exception_error(exc)
        status = err.status
        yield sse_error(err)
        yield DONE
    finally:
        await close_streams(streams)
        log_finished(endpoint, status, timers, stream=True)
