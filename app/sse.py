"""The SSE response of the streaming routes, and the framing of its events. A hot path, kept minimal
on purpose.

Each streamed token is one event, and the event loop that sends them also runs the engine's step
loop, so the per-event work is held to the ASGI send itself: the body iterator yields bytes that are
already framed (`data: ...\\n\\n`), and they go to `send` as they are. sse-starlette's
EventSourceResponse, which this replaces, opened an anyio cancel scope and logged at debug level per
event and started four anyio tasks per response.

Per response there are two helper tasks:
- a disconnect watcher: when the client goes away the body iterator is cancelled at once, which
  closes its engine streams (aborting the requests and freeing their KV blocks);
- a keep-alive task: a `: ping - <time>` comment after every `ping_interval` seconds without an event
  (while the request is queued, say), so proxies keep the connection open.

Shutdown needs nothing here: the server's drain finishes or aborts every engine request, which ends
every stream with its last events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timezone
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.http import wait_for_disconnect

encoder = msgspec.json.Encoder()

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One event: `data: <obj as JSON>\n\n`."""
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


class SSEResponse(Response):
    """`text/event-stream` over an async iterator of framed SSE bytes, with sse-starlette's headers."""

    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        ping_interval: float,
        headers: Mapping[str, str] | None = None,
        status_code: int = 200,
    ) -> None:
        if ping_interval <= 0:
            raise ValueError(f"ping_interval must be > 0; got {ping_interval}")
        self.body_iterator = body
        self.ping_interval = ping_interval
        self.status_code = status_code
        self.background = None
        all_headers = dict(headers or {})
        all_headers.setdefault("Cache-Control", "no-store")
        all_headers["Connection"] = "keep-alive"
        all_headers["X-Accel-Buffering"] = "no"  # nginx: pass events on as they come
        self.init_headers(all_headers)
        self._events = 0  # events sent so far; the keep-alive task skips a ping when it moved

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        streamer = asyncio.ensure_future(self._stream(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        pinger = asyncio.ensure_future(self._keep_alive(send))
        try:
            await asyncio.wait((streamer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            pinger.cancel()
            watcher.cancel()
            if not streamer.done():
                # The client went away (or this task was cancelled): cancelling the streamer throws into
                # the body iterator, whose cleanup aborts its engine requests. Wait for that cleanup.
                streamer.cancel()
            await asyncio.gather(streamer, pinger, watcher, return_exceptions=True)
        if streamer.cancelled():
            return  # the client is gone: nothing more to send
        streamer.result()  # re-raise what the stream raised (the error middleware logs it)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, send: Send) -> None:
        async for chunk in self.body_iterator:
            self._events += 1
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _keep_alive(self, send: Send) -> None:
        seen = self._events
        while True:
            await asyncio.sleep(self.ping_interval)
            if self._events == seen:
                # The same comment format sse-starlette sent, so clients that look for it still see it.
                ping = f": ping - {datetime.now(timezone.utc)}\n\n".encode()
                await send({"type": "http.response.body", "body": ping, "more_body": True})
            seen = self._events
