"""A request's prompt into token ids, once: the OpenAI prompt shapes, the character pre-check, and
tokenizing off the event loop (app/prompt_encoder.py). Chat messages take app/chat_render.py.

What the engine's input processor checks (token ids inside the vocabulary, an empty id list, the
context length) is not checked again here; its typed errors become the app's 400s in
app/request_mapping.py. What stays is what the engine cannot see: the shape of the JSON prompt
union, an empty text (the engine only sees its ids, which may hold a BOS), and the character count
that refuses a huge text before it costs a tokenization.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.errors import APIError, bad_request
from app.state import AppState

MAX_PROMPTS = 256

_PROMPT_SHAPE = (
    "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
)

Prompt = tuple[str | None, list[int]]  # (the text it came from, if any; its token ids)

# JSON decodes to exact types (a JSON bool is a bool, never an int), so a prompt's shape is checked by
# type identity, in C: `_INT.issuperset(map(type, ids))` takes microseconds for S1's 1024-token prompts,
# where a per-element isinstance loop took a good part of the request's set-up time.
_INT, _STR, _LIST = frozenset({int}), frozenset({str}), frozenset({list})


async def parse_prompts(state: AppState, raw: Any, max_tokens: int | None) -> list[Prompt]:
    """/v1/completions' `prompt` as (text, token ids) per prompt; text prompts are tokenized off the
    event loop, once their length in characters has not already proved them too long."""
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list):
        if not raw:
            raise bad_request("prompt must not be empty", param="prompt")
        if _INT.issuperset(map(type, raw)):
            return [(None, raw)]  # S1's shape, the hot one: the engine checks the ids
        if _STR.issuperset(map(type, raw)) or _LIST.issuperset(map(type, raw)):
            items = raw
        else:
            raise bad_request(_PROMPT_SHAPE, param="prompt")
    else:
        raise bad_request(_PROMPT_SHAPE, param="prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"prompt may hold at most {MAX_PROMPTS} prompts; got {len(items)}", param="prompt")
    prompts: list[Prompt] = []
    texts: list[str] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("prompt must not be empty", param="prompt")
            check_prompt_chars(state, item, max_tokens, "prompt", "max_tokens")
            texts.append(item)
            prompts.append((item, []))
        elif _INT.issuperset(map(type, item)):
            prompts.append((None, item))
        else:
            raise bad_request(_PROMPT_SHAPE, param="prompt")
    if texts:
        encoder = state.encoder
        encoded = iter(await encoder.run(lambda: [encoder.encode(t) for t in texts]))
        prompts = [(text, next(encoded)) if text is not None else (None, ids) for text, ids in prompts]
    return prompts


def check_prompt_chars(
    state: AppState, text: str, max_tokens: int | None, prompt_field: str, max_tokens_field: str
) -> None:
    """400 before tokenizing when the text's length in characters already proves it cannot fit
    (app/prompt_encoder.py: a token stands for at most `max_chars_per_token` characters)."""
    at_least = state.encoder.min_tokens(text)
    limit = state.max_model_len
    if at_least < limit and (max_tokens is None or at_least + max_tokens <= limit):
        return
    why = (
        f"the {prompt_field} has {len(text)} characters, so at least {at_least} tokens (no token of this "
        f"model is longer than {state.encoder.max_chars_per_token} characters)"
    )
    if at_least >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, {why}, which leaves no room "
            f"for the completion. Please shorten the {prompt_field}.",
            param=prompt_field,
            code="context_length_exceeded",
        )
    raise APIError(
        400,
        f"This model's maximum context length is {limit} tokens. However, {why}, and {max_tokens_field} "
        f"is {max_tokens}. Please reduce the length of the {prompt_field} or {max_tokens_field}.",
        param=max_tokens_field,
        code="context_length_exceeded",
    )


def check_token_ids(state: AppState, token_ids: Sequence[int], field: str) -> None:
    """For /detokenize, which decodes without the engine: every id inside the vocabulary."""
    # min/max run in C; the loop only finds which id to name once one is out of range.
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < state.vocab_size):
        return
    for t in token_ids:
        if not 0 <= t < state.vocab_size:
            raise bad_request(
                f"{field} contains token id {t}, outside the vocabulary [0, {state.vocab_size})", param=field
            )
