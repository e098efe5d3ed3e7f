"""Chat templates rendered as transformers renders them, with jinja2 alone (no transformers import).

The facts below are those of transformers 5's `apply_chat_template` (utils/chat_template_utils.py),
which weir's own tokenizer (engine/inputs/fast_tokenizer.py) must match output for output and error
for error: a sandboxed, immutable jinja2 environment with trim_blocks and lstrip_blocks, the
loopcontrols extension and a `{% generation %}` block tag, a `tojson` filter that does not escape
HTML, `raise_exception` (a TemplateError carrying the template's message), `strftime_now`, a `dict`
that only builds dicts and a `namespace` that refuses underscore names. Every value the template sees
is rebuilt from plain JSON types first. `continue_final_message` renders the last message with a tag
after it and cuts the text at the tag, so the message stays open.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

# Names a message's reasoning may come under; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
MIN_JINJA2 = (3, 1, 6)  # older versions have known sandbox escapes; transformers refuses them too


def render_chat_template(
    template: str,
    conversation: list[Any],
    *,
    tools: list[Any] | None = None,
    documents: list[Any] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    variables: dict[str, Any] | None = None,
) -> str:
    """The text of one conversation under `template`; `variables` are extra template variables
    (the special tokens' strings, then the caller's keyword arguments)."""
    compiled = compile_template(template)
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, dict):
                # transformers turns Python functions into JSON schemas; weir only passes schemas.
                raise ValueError("tools must be JSON schemas (dicts) with weir's tokenizer")
    if documents is not None:
        for document in documents:
            if not isinstance(document, dict):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    tools = _plain(tools)
    documents = _plain(documents)
    extra = _plain(variables or {})
    chat = _plain(conversation)  # a fresh copy: the edits below never reach the caller's messages
    for message in chat:
        if not isinstance(message, dict):
            raise TypeError(
                f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}."
            )
    chat = _alias_reasoning(chat)
    final_text = None
    if continue_final_message:
        final_text = _tag_final_message(chat, continue_final_message, template)
    text = compiled.render(
        messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **extra
    )
    if final_text is None:
        return text
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in text or tag not in text:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the chat after "
            "applying the chat template! This can happen if the chat template deletes portions of "
            "the final message. Please verify the chat template and final message in your chat to "
            "ensure they are compatible."
            f"Final message to continue: {final_text.strip()}\nRendered chat:\n{text}"
        )
    at = text.rindex(tag)
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the message's trailing space, and the tag's


def _tag_final_message(chat: list[dict], field: bool | str, template: str) -> str:
    """Append the tag to the final message's `field` (or its last text block); its text before."""
    if not chat:
        raise ValueError("continue_final_message is set but the conversation is empty!")
    field = field if isinstance(field, str) else "content"
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
    fields = [field]
    if field in _REASONING_FIELDS:  # reasoning is copied under several names: tag each copy
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in template for f in fields):
        raise ValueError(
            f'continue_final_message is set to "{field}" but this is not an accepted field in the chat_template'
        )
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError(
            "continue_final_message is set but we could not find any text to continue in the final message!"
        )
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value: Any) -> Any:
    """`value` rebuilt from JSON types (anything else becomes "<TypeName>"): templates are untrusted
    code, and rich objects carry methods the sandbox does not know to refuse."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    numpy = sys.modules.get("numpy")  # a numpy scalar can only exist once numpy is imported
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())  # np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(conversation: Any) -> list[dict]:
    """Messages as dicts (dataclasses and pydantic models converted), keys whose value is None dropped."""
    messages = _to_dicts(getattr(conversation, "messages", conversation))
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(
                f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}."
            )
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _to_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value


@lru_cache
def compile_template(template: str) -> Any:
    """The compiled template (cached: a server renders the same one for every request)."""
    import jinja2  # noqa: PLC0415 - only where a template is compiled (the tokenizer's thread)
    import jinja2.ext  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag(jinja2), jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class(jinja2)
    return env.from_string(template)


def _raise_exception(message: str) -> None:
    import jinja2  # noqa: PLC0415

    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters, which a prompt must keep as they are.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` in a template, without the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _namespace_class(jinja2: Any) -> type:
    class TemplateNamespace(jinja2.utils.Namespace):
        """jinja2's namespace, refusing underscore-prefixed names (a way towards CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja2 Namespace's own signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                    "Please rename the attribute."
                )

    return TemplateNamespace


@lru_cache(maxsize=1)
def _generation_tag(jinja2: Any) -> type:
    import jinja2.ext  # noqa: PLC0415

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: marks the assistant's text for training masks;
        rendering keeps the body as it is (weir never asks for the mask)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    return GenerationTag
