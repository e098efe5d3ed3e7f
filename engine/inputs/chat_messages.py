"""Chat messages checked and normalised for a chat template: one rule set for `LLM.chat` and the
server's chat route (app/chat_render.py), so both refuse the same input with the same words.

A message is a dict (LLM.chat) or an object with the same attributes (the server's decoded
ChatMessage): `role` (system, developer, user or assistant), `content` (a string, a list of text
parts, or null for an assistant turn), optional `name`. Anything else fails here, naming the message
and its field (`messages[0].content`), instead of inside the template ("'int' object is not
iterable") or, for an unknown role, not at all. Plain Python: no tokenizer, no jinja.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.errors import InvalidRequestError, UnsupportedRequestError

ROLES = ("system", "developer", "user", "assistant")
_MISSING = object()


def _getter(item: Any):  # noqa: ANN202 - a field reader for a dict or an attribute object
    if isinstance(item, Mapping):
        return lambda name: item.get(name, _MISSING)
    return lambda name: getattr(item, name, _MISSING)


def conversation_of(messages: Any, where: str = "messages") -> list[dict[str, Any]]:
    """The messages as the chat template takes them ({"role", "content"[, "name"]}, developer as
    system, text parts joined by newlines). InvalidRequestError naming the field for anything wrong
    (UnsupportedRequestError for tool calls and non-text parts); `where` prefixes the field names."""
    if not isinstance(messages, (list, tuple)):  # a str, bytes or a single dict too
        raise InvalidRequestError(
            where,
            f"{where} must be a list of messages (dicts with role and content); got {type(messages).__name__}",
        )
    if not messages:
        raise InvalidRequestError(where, f"{where} must not be empty")
    conversation: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if isinstance(m, (str, bytes, list, tuple)) or m is None:
            raise InvalidRequestError(
                at, f"{at} must be a message (a dict with role and content); got {type(m).__name__}"
            )
        get = _getter(m)
        role = get("role")
        if role is _MISSING or role is None:
            raise InvalidRequestError(f"{at}.role", f"{at}.role is required")
        if role not in ROLES:
            raise InvalidRequestError(
                f"{at}.role", f"{at}.role must be one of {', '.join(ROLES)}; got {role!r}"
            )
        if get("tool_calls") not in (_MISSING, None):
            raise UnsupportedRequestError(
                f"{at}.tool_calls", f"{at}.tool_calls: tool calls are not supported by weir yet"
            )
        content = get("content")
        if content is _MISSING or content is None:
            if role != "assistant":
                raise InvalidRequestError(f"{at}.content", f"{at}.content must not be null")
            content = ""
        elif isinstance(content, list):
            content = "\n".join(_part_text(part, f"{at}.content[{j}]") for j, part in enumerate(content))
        elif not isinstance(content, str):
            raise InvalidRequestError(
                f"{at}.content",
                f"{at}.content must be a string, a list of text parts or null; got {type(content).__name__}",
            )
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        name = get("name")
        if name not in (_MISSING, None):
            if not isinstance(name, str):
                raise InvalidRequestError(
                    f"{at}.name", f"{at}.name must be a string; got {type(name).__name__}"
                )
            entry["name"] = name
        conversation.append(entry)
    return conversation


def _part_text(part: Any, at: str) -> str:
    if isinstance(part, (str, bytes, list, tuple)) or part is None:
        raise InvalidRequestError(
            at, f"{at} must be a content part (a dict with type and text); got {type(part).__name__}"
        )
    get = _getter(part)
    kind = get("type")
    if kind != "text":
        shown = None if kind is _MISSING else kind
        raise UnsupportedRequestError(
            f"{at}.type", f"{at}.type: only text content parts are supported; got {shown!r}"
        )
    text = get("text")
    if text is _MISSING or text is None:
        raise InvalidRequestError(f"{at}.text", f"{at}.text is required for a text part")
    if not isinstance(text, str):
        raise InvalidRequestError(f"{at}.text", f"{at}.text must be a string; got {type(text).__name__}")
    return text
