"""Writing a generation route's response from its engine streams: an SSE stream of chunks, or one JSON
body once every stream finished. Either way the streams are closed (aborting what is left) and the
request is logged, however it ends.

The route supplies a `ResponseShape`, which knows its endpoint's chunk and response shapes; what is
here is the same for both endpoints: reading the streams, the timers, failures, usage, [DONE].
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from typing import Any, Protocol

import anyio
from starlette.requests import Request
from starlette.responses import Response

from app.errors import APIError, error_from_engine
from app.http import ClientGone, unless_disconnected
from app.logging import get_logger
from app.protocol import Usage
from app.request_timer import RequestTimer, log_finished, usage_of
from app.sse import DONE, SSEResponse, encoder, sse
from app.state import AppState
from app.submission import close_streams
from engine.outputs.request_output import RequestOutput

log = get_logger("weir.app")


class ResponseShape(Protocol):
    endpoint: str  # for the log line

    def head(self) -> Iterator[bytes]:
        """SSE events sent before any output (chat's role chunks)."""
        ...

    def chunks(self, p: int, out: RequestOutput) -> Iterator[bytes]:
        """The SSE events for output `out` of prompt `p`'s stream (its deltas)."""
        ...

    def usage_chunk(self, usage: Usage) -> bytes: ...

    def response(self, finals: list[RequestOutput], usage: Usage) -> Any:
        """The whole response from the finished outputs, one per prompt."""
        ...


async def respond(
    request: Request,
    state: AppState,
    streams: Sequence[AsyncIterator[RequestOutput]],
    timers: Sequence[RequestTimer],
    builder: ResponseShape,
    *,
    stream: bool,
    include_usage: bool,
    headers: dict[str, str],
) -> Response:
    """Stream the outputs as SSE, or collect them into one JSON body."""
    if stream:
        body = stream_body(state, streams, timers, builder, include_usage)
        return SSEResponse(body, ping_interval=state.config.sse_keepalive, headers=headers)
    return await collect_response(request, state, streams, timers, builder, headers)


# ---------------------------------------------------------------- streamed


async def stream_body(
    state: AppState,
    streams: Sequence[AsyncIterator[RequestOutput]],
    timers: Sequence[RequestTimer],
    builder: ResponseShape,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE body: the builder's head, its chunks for each output as it comes, then an error event
    or (with `include_usage`) the usage chunk, then [DONE]. Status 499 in the log when the client
    went away."""
    status = 499  # unless it ends otherwise: the client went away
    chunks = builder.chunks
    try:
        for b in builder.head():
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
            yield sse(err.body())
        else:
            status = 200
            if include_usage:
                yield builder.usage_chunk(usage_of(timers))
        yield DONE
    except Exception as exc:
        err = stream_exception_error(exc)
        status = err.status
        yield sse(err.body())
        yield DONE
    finally:
        await close_streams(streams)
        log_finished(builder.endpoint, status, timers, stream=True)


# ---------------------------------------------------------------- collected


async def collect_response(
    request: Request,
    state: AppState,
    streams: Sequence[AsyncIterator[RequestOutput]],
    timers: Sequence[RequestTimer],
    builder: ResponseShape,
    headers: dict[str, str],
) -> Response:
    """Wait for every stream to finish (aborting them if the client leaves) and answer in one body."""
    status = 500
    try:
        try:
            finals = await unless_disconnected(request, _collect(streams, timers))
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
        body = encoder.encode(builder.response(finals, usage_of(timers)))
        status = 200
        return Response(body, media_type="application/json", headers=headers)
    finally:
        await close_streams(streams)
        log_finished(builder.endpoint, status, timers, stream=False)


async def _collect(
    streams: Sequence[AsyncIterator[RequestOutput]], timers: Sequence[RequestTimer]
) -> list[RequestOutput]:
    async with aclosing(merge(streams)) as outs:
        async for i, out in outs:
            timers[i].on_output(out)
    return [t.last_out for t in timers]  # type: ignore[misc]


# ---------------------------------------------------------------- shared


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
    """What a stream that raised tells the client: an engine error's envelope, else a logged 500."""
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
