"""The OpenAI error envelope and the one exception type routes raise to produce it.

Every failure a client can see is `{"error": {"message", "type", "param", "code"}}` with the status
below. Routes raise `APIError`; `error_from_exception` maps engine errors and msgspec decode errors
onto it, so no route formats an error body by hand.
"""

from __future__ import annotations

import re

import msgspec
from starlette.responses import Response

from app.protocol import ErrorBody, ErrorInfo
from engine.errors import EngineDeadError, EngineDrainingError, QueueFullError, RequestFailedError

_encoder = msgspec.json.Encoder()


class APIError(Exception):
    """An error a client receives as-is: status, message, and the request field it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorBody:
        return ErrorBody(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def response(self) -> Response:
        return Response(
            _encoder.encode(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------- msgspec decode errors

# msgspec: "Expected `int`, got `str` - at `$.max_tokens`" / "Object missing required field `model`".
_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def error_from_decode(exc: msgspec.DecodeError) -> APIError:
    """A 400 that names the JSON path msgspec complained about (`max_tokens`, `messages[0].role`)."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return APIError(400, f"The request body is not valid JSON: {text}", code="invalid_json")
    path = ""
    if m := _AT_PATH.search(text):
        path = m.group("path").lstrip(".")
        text = text[: m.start()]
    if m := _MISSING.match(text):
        path = f"{path}.{m.group('field')}" if path else m.group("field")
    # msgspec writes a dict value's key as `[...]` (`logit_bias[...]`): not a field a client can look up,
    # so `param` names the dict itself; the message keeps msgspec's path.
    param = path.replace("[...]", "") or None
    message = f"{text} (at `{path}`)" if path else text
    return APIError(400, f"Invalid request: {message}", param=param, code="invalid_type")


# ---------------------------------------------------------------- engine errors

_WORD = re.compile(r"[a-z_]+")
_LEADING_FIELD = re.compile(r"^(?P<field>[a-z_]+)(?:\[[^\]]*\])?[\s:(]")


def error_from_value_error(exc: ValueError, known_fields: frozenset[str]) -> APIError:
    """SamplingParams / engine ValueErrors start with the field they are about ("top_p must be ...")."""
    message = str(exc)
    param = None
    if m := _LEADING_FIELD.match(message):
        if m.group("field") in known_fields:
            param = m.group("field")
    if param is None:  # "each stop string may be ...": the first field the message names
        for word in _WORD.findall(message):
            if word in known_fields:
                param = word
                break
    code = "context_length_exceeded" if "max_model_len" in message else "invalid_value"
    return APIError(400, message, param=param, code=code)


def error_from_engine(exc: BaseException) -> APIError | None:
    """The status for an engine-side refusal or failure; None for anything that is a bug."""
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            f"The server is at capacity, try again later: {exc}",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineDrainingError):
        return service_unavailable("The server is shutting down and takes no new requests.", "draining")
    if isinstance(exc, EngineDeadError):
        return service_unavailable(f"The engine has stopped and cannot serve: {exc}", "engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(
            500, f"The request failed in the engine: {exc}", type="server_error", code="engine_error"
        )
    return None


def service_unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": "5"})


def internal_error() -> APIError:
    return APIError(
        500,
        "Internal server error; the server logged the details.",
        type="server_error",
        code="internal_error",
    )
