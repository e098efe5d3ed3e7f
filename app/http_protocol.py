"""uvicorn's httptools protocol with bounds on the request head (request line + headers).

httptools (llhttp) has no limit of its own: it grows a header's name and value in memory for as long
as the client keeps sending, and uvicorn waits for the end of the headers forever. A client could
so hold the server's memory (a 200 MB header) and connections (headers that never end). This
subclass bounds, per request:

- the head's size in bytes (`max_header_bytes`): 431, then close. Counted on the bytes received while
  the head is incomplete, so a head that never ends is cut off after at most one read past the limit,
  and exactly (request line + every name and value) once it is complete;
- the number of header fields (`max_header_count`): 431, then close;
- the time to receive the head (`header_timeout`, from the connection or from the request's first
  byte): 408, then close. An idle keep-alive connection is uvicorn's own timeout_keep_alive's.

The answers are written straight to the transport, as uvicorn answers a malformed request: the app
never sees these requests. The body keeps its own bound (--max-body-bytes, 413, in app/http.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.protocol import ErrorBody, ErrorInfo

_encoder = msgspec.json.Encoder()
_LINGER_S = 2.0


class _HeadRejected(Exception):
    """Raised inside a parser callback to stop parsing a head over its bounds."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    # Set per server by `limited_protocol`.
    max_header_bytes = 64 * 1024
    max_header_count = 256
    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_head = True  # between a request's first byte (or the connection) and its headers' end
        self._head_bytes = 0  # bytes received while awaiting the head (an upper bound of its size)
        self._head_size = 0  # exact: request line + header names and values so far
        self._header_count = 0
        self._rejection: tuple[int, str, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejection is not None:
            return  # answered and closing: ignore the rest
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            # A callback below raised _HeadRejected (httptools wraps it), or the request is malformed.
            if self._rejection is not None:
                self._send_rejection()
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        if self._awaiting_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._reject_head_size()
                self._send_rejection()

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_head = True
        self._head_bytes = 0
        self._head_size = 0
        self._header_count = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.max_header_bytes:
            self._reject_head_size()
            raise _HeadRejected()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > self.max_header_count:
            self._rejection = (
                431,
                f"The request has more than {self.max_header_count} header fields "
                "(the server's --max-header-count).",
                "request_header_fields_too_large",
            )
            raise _HeadRejected()
        if self._head_size > self.max_header_bytes:
            self._reject_head_size()
            raise _HeadRejected()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    # ---------------------------------------------------------------- rejections

    def _reject_head_size(self) -> None:
        self._rejection = (
            431,
            f"The request line and headers are larger than {self.max_header_bytes} bytes "
            "(the server's --max-header-bytes).",
            "request_header_fields_too_large",
        )

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._on_head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport is None or self.transport.is_closing():
            return
        self._rejection = (
            408,
            f"The request line and headers did not arrive within {self.header_timeout:g} s "
            "(the server's --header-timeout).",
            "request_timeout",
        )
        self._send_rejection()

    def _send_rejection(self) -> None:
        assert self._rejection is not None
        status, message, code = self._rejection
        self._disarm_head_timer()
        self.logger.info("request head rejected: %s %s", status, message)
        body = _encoder.encode(
            ErrorBody(error=ErrorInfo(message=message, type="invalid_request_error", param=None, code=code))
        )
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        # Lingering close: stop writing, then read and drop what the client is still sending for a
        # moment. Closing at once with unread bytes would reset the connection, and the client would
        # likely never see the answer.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()


def limited_protocol(max_header_bytes: int, max_header_count: int, header_timeout: float) -> type:
    """The protocol class for one server's bounds (uvicorn instantiates it per connection)."""
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "max_header_bytes": max_header_bytes,
            "max_header_count": max_header_count,
            "header_timeout": header_timeout,
        },
    )
