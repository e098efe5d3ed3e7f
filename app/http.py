"""Edge helpers every route uses: API-key check, body limits, JSON decoding, error translation,
waiting for a client to go away.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import APIError, error_from_decode, internal_error
from app.logging import get_logger

log = get_logger("weir.app")
_stdlib_log = logging.getLogger("weir.app")

T = TypeVar("T")

OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer KEY` matches one of the keys. /health, /metrics, /openapi.json stay open.

    Every key is compared, in constant time, so the response time tells nothing about which key
    came close.
    """

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = credentials.strip()
                break
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(token, key)
        if ok:
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided." if token else "Missing API key: send 'Authorization: Bearer KEY'."
        )
        err = APIError(
            401,
            message,
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        log.info("request rejected", path=scope["path"], status=401, error=message)
        await err.response()(scope, receive, send)


def api_route(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Turns APIError into its envelope and any other exception into a logged, traceback-free 500."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        structlog.contextvars.clear_contextvars()
        try:
            return await handler(request)
        except APIError as exc:
            log.info(
                "request rejected",
                path=request.url.path,
                status=exc.status,
                error=exc.message,
                param=exc.param,
            )
            return exc.response()
        except Exception:
            log.exception("unhandled error", path=request.url.path)
            return internal_error().response()

    return wrapper


async def read_body(request: Request, limit: int) -> bytes:
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise APIError(
                415,
                f"Unsupported content type {media!r}; send 'Content-Type: application/json'.",
                code="unsupported_media_type",
            )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(
            400, "The client disconnected while sending the body.", code="client_disconnected"
        ) from None
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


_decoders: dict[type, msgspec.json.Decoder] = {}


def decode(body: bytes, struct_type: type[T]) -> T:
    if not body.strip():
        raise APIError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    decoder = _decoders.get(struct_type)
    if decoder is None:
        decoder = _decoders[struct_type] = msgspec.json.Decoder(struct_type)
    try:
        value = decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise error_from_decode(exc) from None
    except RecursionError:
        # msgspec recurses once per level of nesting, also in fields it skips or leaves untyped.
        raise APIError(
            400,
            "The request body nests JSON arrays or objects too deeply; no field of this API needs more "
            "than a few levels.",
            code="invalid_json",
        ) from None
    if _stdlib_log.isEnabledFor(logging.DEBUG):
        _log_unknown_fields(body, struct_type)
    return value


def _log_unknown_fields(body: bytes, struct_type: type) -> None:
    try:
        keys = msgspec.json.decode(body, type=dict[str, msgspec.Raw]).keys()
    except (msgspec.DecodeError, RecursionError):
        return
    unknown = sorted(set(keys) - set(struct_type.__struct_fields__))  # type: ignore[attr-defined]
    if unknown:
        log.debug("ignoring unknown fields", fields=unknown)


async def read_json(request: Request, struct_type: type[T], limit: int) -> T:
    return decode(await read_body(request, limit), struct_type)


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client goes away. Only call once the body has been read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it (and so aborting its engine requests) if the client disconnects."""
    task: asyncio.Future[Any] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()
