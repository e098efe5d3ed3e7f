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


def _unset(v: Any) -> bool:
    return v is None


def _false(v: Any) -> bool:
    return v is None or v is False


_ASK_IN_PROMPT = "ask for the output in the prompt instead"

# field -> (accepts the value as the default, what it would need, what to do instead)
_CHAT_ONLY: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "tools": (_null_or_empty, "tool calling", _ASK_IN_PROMPT),
    "tool_choice": (lambda v: v is None or v == "none", "tool calling", _ASK_IN_PROMPT),
    "functions": (_null_or_empty, "function calling", _ASK_IN_PROMPT),
    "function_call": (lambda v: v is None or v == "none", "function calling", _ASK_IN_PROMPT),
    "modalities": (lambda v: v is None or v == ["text"], "outputs other than text", _ASK_IN_PROMPT),
    "audio": (_unset, "audio output", _ASK_IN_PROMPT),
    "web_search_options": (_unset, "web search", _ASK_IN_PROMPT),
    # vLLM's extra chat fields
    "chat_template": (
        _unset,
        "request-supplied chat templates",
        "the model's own template renders the messages",
    ),
    "chat_template_kwargs": (
        _null_or_empty,
        "chat template arguments",
        "the model's own template renders the messages",
    ),
    "documents": (_null_or_empty, "template documents (RAG)", "put the documents in a message"),
    "continue_final_message": (_false, "continuing the final message", "end the messages with a user turn"),
    "echo": (_false, "echo on chat", "the prompt is the messages you sent"),
    "add_special_tokens": (_false, "added special tokens on chat", "the chat template places them"),
    "best_of": (
        lambda v: v is None or v == 1,
        "best_of on chat",
        "use /v1/completions for best_of, or n for several samples",
    ),
}
_BOTH: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "response_format": (_text_format, "structured output (json_object, json_schema)", _ASK_IN_PROMPT),
    # vLLM's extra fields that change the output, which clients written for vLLM send: refused, not ignored
    **{
        name: (_unset, "structured output (guided decoding)", _ASK_IN_PROMPT)
        for name in (
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "guided_decoding_backend",
            "guided_whitespace_pattern",
            "structured_outputs",
        )
    },
    "prompt_logprobs": (
        _unset,
        "prompt_logprobs",
        "on /v1/completions, echo with logprobs returns the prompt's",
    ),
    "truncate_prompt_tokens": (_unset, "prompt truncation", "send the part of the prompt to use"),
    "allowed_token_ids": (_null_or_empty, "vocabulary restriction", "use logit_bias"),
    "bad_words": (_null_or_empty, "banned words", "use logit_bias"),
    "logits_processors": (_null_or_empty, "custom logits processors", "use logit_bias"),
    "return_tokens_as_token_ids": (_false, "token ids in place of token text", "use /tokenize"),
}
_COMPLETION_ONLY: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "add_special_tokens": (
        lambda v: v is None or v is True,
        "prompts without special tokens",
        "send token ids",
    ),
}


def check_unsupported(req: Any, chat: bool) -> None:
    """400 naming the first unsupported field the request sets."""
    fields = {**_BOTH, **_CHAT_ONLY} if chat else {**_BOTH, **_COMPLETION_ONLY}
    for name, (is_default, feature, instead) in fields.items():
        value = getattr(req, name)
        if not is_default(value):
            raise bad_request(
                f"{name} is not supported: weir has no {feature} yet. Leave {name} out (or at its default); "
                f"{instead}.",
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
