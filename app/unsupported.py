"""OpenAI request fields weir does not implement yet, refused when set to anything but their default.

Answering 200 with free text to a request that asked for a tool call or for JSON would look like
success and be wrong; a 400 that names the field is honest. Fields weir ignores because they cannot
change the output (user, store, metadata, ...) are listed in the README instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.errors import bad_request


def _null_or_empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _text_format(v: Any) -> bool:
    return v is None or v == {"type": "text"}


# field -> (accepts the value as the default, what it would need)
_CHAT_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_null_or_empty, "tool calling"),
    "tool_choice": (lambda v: v is None or v == "none", "tool calling"),
    "functions": (_null_or_empty, "function calling"),
    "function_call": (lambda v: v is None or v == "none", "function calling"),
    "modalities": (lambda v: v is None or v == ["text"], "outputs other than text"),
    "audio": (lambda v: v is None, "audio output"),
    "web_search_options": (lambda v: v is None, "web search"),
}
_BOTH: dict[str, tuple[Callable[[Any], bool], str]] = {
    "response_format": (_text_format, "structured output (json_object, json_schema)"),
}


def check_unsupported(req: Any, chat: bool) -> None:
    """400 naming the first unsupported field the request sets."""
    fields = {**_BOTH, **_CHAT_ONLY} if chat else _BOTH
    for name, (is_default, feature) in fields.items():
        value = getattr(req, name)
        if not is_default(value):
            raise bad_request(
                f"{name} is not supported: weir has no {feature} yet. Leave {name} out (or at its default) "
                "and ask for the output in the prompt instead.",
                param=name,
                code="unsupported",
            )
    opts = getattr(req, "stream_options", None)
    if opts is not None and opts.continuous_usage_stats:
        raise bad_request(
            "stream_options.continuous_usage_stats is not supported: weir sends usage once, in the last "
            "chunk (stream_options.include_usage).",
            param="stream_options.continuous_usage_stats",
            code="unsupported",
        )
    if opts is not None and not getattr(req, "stream", False):
        # As OpenAI's API answers it: options of a stream that was not asked for would go unused.
        raise bad_request(
            "stream_options is only allowed when stream is true", param="stream_options", code="invalid_value"
        )
