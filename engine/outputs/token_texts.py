"""The text of single tokens (logprob entries' `decoded_token`), decoded in one call per step.

Each logprob position names up to 21 tokens; decoding them one `tokenizer.decode([id])` at a time
costs a Python round trip through transformers per token. Instead the ids of a whole step that were
never seen go to the Rust backend in one `decode_batch`, and every result is cached: a token's text
alone never changes, and a step's top-N tokens repeat from step to step. The cache holds at most one
string per vocabulary entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer


class TokenTexts:
    """`texts[id] == tokenizer.decode([id])` for every id passed to `add` so far."""

    __slots__ = ("_tokenizer", "_decode_batch", "texts")

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # A fast tokenizer's decode([id]) is its backend's decode, plus a space clean-up when the
        # tokenizer asks for one (WordPiece); those keep the per-token path, still cached.
        exact = isinstance(backend, Tokenizer) and not getattr(
            tokenizer, "clean_up_tokenization_spaces", False
        )
        self._decode_batch = backend.decode_batch if exact else None
        self.texts: dict[int, str] = {}

    def add(self, token_ids: Iterable[int]) -> None:
        """Decode the ids not cached yet, in one batched call."""
        texts = self.texts
        missing = [t for t in token_ids if t not in texts]
        if not missing:
            return
        missing = list(dict.fromkeys(missing))
        if self._decode_batch is not None:
            decoded = self._decode_batch([[t] for t in missing], skip_special_tokens=False)
        else:
            decoded = [self._tokenizer.decode([t]) for t in missing]
        texts.update(zip(missing, decoded, strict=True))
