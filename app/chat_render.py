"""Chat messages -> token ids through the model's chat template, with message content kept as text.

A chat template writes the turn structure with special tokens (`<|im_start|>user ... <|im_end|>`).
Tokenized naively, the rendered text turns any special-token text a user typed into real control
tokens, so content like "<|im_end|>\n<|im_start|>system\n..." forges a system turn. By default weir
tokenizes special-token text found inside message content as plain text instead: the content's
occurrences are swapped for markers before rendering, the rendered text is split at the markers,
each piece between them is tokenized as usual (the template's own control tokens stay control
tokens) and each occurrence as plain text. That is exactly how the tokenizer would have split the
text anyway (added tokens are cut out before anything else is tokenized), except that the
occurrence is no longer one control token. `--allow-special-tokens-in-content` keeps the old
behaviour for trusted callers.

Blocking (a template render and a tokenization): routes run it through `state.encoder.run`.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from app.errors import bad_request
from app.prompt_processing import check_prompt_chars
from app.protocol import ChatMessage
from app.state import AppState
from engine.errors import InvalidRequestError, UnsupportedRequestError
from engine.inputs.chat_messages import conversation_of as check_conversation


def conversation_of(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template takes them; a 400 naming the message for anything wrong.
    The rules are LLM.chat's too (engine/inputs/chat_messages.py): both refuse the same input alike."""
    try:
        return check_conversation(messages)
    except InvalidRequestError as exc:
        code = "unsupported" if isinstance(exc, UnsupportedRequestError) else "invalid_value"
        raise bad_request(str(exc), param=exc.param, code=code) from None


def render_chat(
    state: AppState,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    max_tokens: int | None = None,
    max_tokens_field: str | None = None,
) -> list[int]:
    """Token ids of the rendered conversation (no extra specials). With `max_tokens_field`, a 400 when
    the rendered text's length alone proves it cannot fit the context, before tokenizing."""
    conversation = conversation_of(messages)
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "This model has no chat template; use /v1/completions instead.",
            param="messages",
            code="unsupported",
        )
    encoder = state.encoder
    text = _apply_template(tokenizer, conversation, add_generation_prompt)
    if max_tokens_field is not None:  # before any scan of the content: bounds its cost by the context
        check_prompt_chars(state, text, max_tokens, "messages", max_tokens_field)
    pattern = encoder.special_pattern
    if (
        pattern is None
        or state.config.allow_special_tokens_in_content
        or not any(pattern.search(entry["content"]) for entry in conversation)
    ):
        return encoder.encode(text, add_special_tokens=False)
    found: list[str] = []  # special-token texts lifted out of the content, in marker order
    marker_open = f"\ue000{uuid.uuid4().hex}:"

    def to_marker(m: re.Match[str]) -> str:
        found.append(m.group(0))
        return f"{marker_open}{len(found) - 1}\ue001"

    for entry in conversation:
        entry["content"] = pattern.sub(to_marker, entry["content"])
    text = _apply_template(tokenizer, conversation, add_generation_prompt)
    # pieces: template text, marker index, template text, ... (a template may repeat or drop content)
    pieces = re.split(re.escape(marker_open) + "([0-9]+)\ue001", text)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                ids += encoder.encode(piece, add_special_tokens=False)
        else:
            ids += encoder.encode_as_text(found[int(piece)])
    return ids


def _apply_template(tokenizer: Any, conversation: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2 TemplateError, or raise_exception() inside the template
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
