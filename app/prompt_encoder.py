"""Tokenizing off the event loop, and the character rule that refuses a prompt without tokenizing it.

Tokenizing is the one piece of request set-up whose cost grows with the body: a megabyte of text is
a second or more of CPU. On the event loop that second stops every stream and /health, so every
tokenization (prompts, chat templates, /tokenize, /detokenize) runs on a small thread pool. The
Rust tokenizer releases the GIL while it encodes (`encode_batch_fast`), so the loop keeps running.

Before that, most oversized prompts are refused for free, by their length in characters. For a BPE
tokenizer whose normalizer never makes text shorter, every token stands for at most M characters,
where M is the longest vocabulary entry (its length in bytes, for byte-level BPE, where a character
is one byte or more; added tokens by their text). So a text of C characters has at least ceil(C / M)
tokens, and when that alone does not fit the context the prompt is too long, whatever its tokens.
Where that cannot be proven (other tokenizer kinds, a normalizer that may shorten text, fused unknown
tokens) M is None and every prompt is tokenized, still off the loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# Normalizers that never make a text shorter: Prepend adds, a Replace of a literal by a string at
# least as long does not shorten either.
_LENGTH_SAFE_NORMALIZERS = {"Prepend"}


def max_chars_per_token(tokenizer: Any) -> int | None:
    """M of the module docstring: the most characters one token can stand for; None if unprovable."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("fuse_unk"):
        return None
    if not _never_shortens(spec.get("normalizer")):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    return max((len(t) for t in vocab), default=0) or None


def _never_shortens(normalizer: dict | None) -> bool:
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_never_shortens(n) for n in normalizer.get("normalizers", []))
    if kind == "Replace":
        pattern = normalizer.get("pattern") or {}
        literal = pattern.get("String")
        return literal is not None and len(normalizer.get("content", "")) >= len(literal)
    return kind in _LENGTH_SAFE_NORMALIZERS


class PromptEncoder:
    """The tokenizer behind a thread pool, plus the character rule."""

    def __init__(self, tokenizer: Any, max_workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self.max_chars_per_token = max_chars_per_token(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # encode_batch_fast (no offsets) releases the GIL; a plain encode would hold it throughout.
        self._encode_fast = getattr(backend, "encode_batch_fast", None)
        self._decode_batch = getattr(backend, "decode_batch", None)  # releases the GIL too
        # The special tokens' texts, longest first (so `<|a|>x` is not cut at a shorter `<|a|>`).
        specials = sorted(
            {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special},
            key=len,
            reverse=True,
        )
        self.special_pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        # Each special token's text read as plain text. Computed here, once, before serving: asking
        # the tokenizer with split_special_tokens=True flips a flag on the shared Rust tokenizer.
        previous = getattr(backend, "encode_special_tokens", None)
        try:
            self._as_text = {
                s: list(tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"])
                for s in specials
            }
        finally:
            if previous is not None:
                backend.encode_special_tokens = previous
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="weir-tokenize")

    def min_tokens(self, text: str) -> int:
        """A lower bound of the tokens of `text` (0 when no bound is provable)."""
        if self.max_chars_per_token is None:
            return 0
        return math.ceil(len(text) / self.max_chars_per_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids, as `tokenizer.encode` gives them. Blocking: call it through `run`."""
        if self._encode_fast is not None:
            return self._encode_fast([text], add_special_tokens=add_special_tokens)[0].ids
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        """Text of token ids, as `tokenizer.decode` gives it. Blocking: call it through `run`."""
        if self._decode_batch is None:
            return self.tokenizer.decode(token_ids)
        text = self._decode_batch([token_ids], skip_special_tokens=False)[0]
        if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            text = self.tokenizer.clean_up_tokenization(text)
        return text

    def encode_as_text(self, special: str) -> list[int]:
        """The ids of a special token's text read as plain text (never the control token)."""
        return self._as_text[special]

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the pool (exceptions, such as an APIError, come back to the caller)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
