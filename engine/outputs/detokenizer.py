"""Incremental detokenization with stop strings, one instance per generated sequence.

Each step decodes only a small window of recent tokens (vLLM's prefix/read offsets): the text of
`ids[prefix_offset:]` minus the text of `ids[prefix_offset:read_offset]` is what the new tokens add.
Decoding from a few tokens back, rather than the new tokens alone, keeps decoders that depend on
context (SentencePiece's leading-space rule, byte-level tokens that split a character) exact.
When the window's text ends in U+FFFD, a byte-level token ended mid-character: nothing is emitted and
the offsets stay put until a later token completes it, so no delta ever holds half a character.

Stop strings: a match can only end inside the newly decoded characters, so each step searches those
plus (longest stop string - 1) characters before them. Deltas hold back that many trailing
characters while the sequence runs, so text that a later stop match would cut is never streamed;
`finish()` releases them. Everything after a stop string is dropped.

With a fast tokenizer, each step's window runs in Rust: a `tokenizers.decoders.DecodeStream` keeps the
same offsets and returns the same text (the same algorithm: it emits nothing while the window ends in
U+FFFD and decodes the new prefix after emitting), ~3x faster per token than two decodes from Python. The
ids and offsets are kept here too (cheap list work), for the flush at `finish()`, which the stream has no
call for: a trailing incomplete character is decoded there as U+FFFD, as tokenizer.decode does.

Deferred (`deferred=True`): a sequence whose text no one reads before it ends (a final-only output, or
best_of > n) and that no stop string can end only collects its ids, and `finish()` decodes them in one
window, as a first step given every token at once would: the same text (tests/engine/test_detokenizer.py
holds the two paths equal), with two decodes a sequence instead of two a step.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from engine.core.sampling_params import SamplingParams

# Prompt tokens decoded in front of the first output token, as context for the decoder.
_INITIAL_PREFIX_TOKENS = 5
# Drop consumed tokens from the window once this many have piled up in front of it.
_TRIM_THRESHOLD = 512
_REPLACEMENT_CHAR = "\ufffd"


def _decode_stream_class() -> Any:
    """tokenizers' DecodeStream where it takes a prompt tail (`ids`) and a list of ids per step
    (tokenizers 0.22 and later); None with an older one, which keeps the Python window."""
    try:
        from tokenizers.decoders import DecodeStream
        from tokenizers.models import WordLevel

        DecodeStream([0], skip_special_tokens=False).step(Tokenizer(WordLevel({"a": 0}, unk_token="a")), [0])
    except (ImportError, TypeError):
        return None
    return DecodeStream


_DECODE_STREAM = _decode_stream_class()


class IncrementalDetokenizer:
    __slots__ = (
        "tokenizer",
        "_backend",
        "_skip_special_tokens",
        "_spaces_between_special_tokens",
        "_stop",
        "_include_stop",
        "_holdback",
        "_min_tokens",
        "_ids",
        "_prefix_offset",
        "_read_offset",
        "_prefix_text",
        "_text",
        "_sent",
        "num_output_tokens",
        "stop_string",
        "finished",
        "_deferred",
        "_stream",
    )

    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams, deferred: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's decode (without clean-up) is exactly its Rust backend's decode; calling
        # the backend directly skips several microseconds of Python wrapping per call.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if isinstance(backend, Tokenizer) else None
        self._skip_special_tokens = params.skip_special_tokens
        self._spaces_between_special_tokens = params.spaces_between_special_tokens
        self._stop: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        # With the stop string kept in the output, the cut point always lies past what was streamed.
        longest = max((len(s) for s in self._stop), default=0)
        self._holdback = 0 if self._include_stop else max(longest - 1, 0)
        self._min_tokens = params.min_tokens

        # The decode window: a prompt tail followed by the outputs not yet trimmed away.
        self._ids: list[int] = list(prompt_token_ids[-_INITIAL_PREFIX_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # The text of ids[_prefix_offset:_read_offset], once decoded: a step that emits nothing (an
        # incomplete character) leaves the offsets as they are, and the next step reuses it.
        self._prefix_text: str | None = None

        self._text = ""  # decoded output text, cut at a stop string once one matched
        self._sent = 0  # characters of _text already returned by get_next_delta()
        self.num_output_tokens = 0
        self.stop_string: str | None = None  # the stop string that ended the sequence, if any
        self.finished = False
        # Decode once, at finish(): only where the text is read at the end alone and no stop string
        # needs it while the sequence runs.
        self._deferred = deferred and not self._stop
        # The step windows' decoder in Rust (fast tokenizers only), primed with the prompt tail.
        self._stream: Any = None  # tokenizers.decoders.DecodeStream
        if _DECODE_STREAM is not None and self._backend is not None and not self._deferred:
            self._stream = _DECODE_STREAM(list(self._ids), skip_special_tokens=self._skip_special_tokens)

    # ------------------------------------------------------------------ public
    @property
    def output_text(self) -> str:
        """The text so far, as streamed: while running, the held-back tail is not included yet."""
        if self._holdback == 0 or self.finished or self.stop_string is not None:
            return self._text  # the common case, read every step: no call, no slice
        return self._text[: self._visible_end()]

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append newly sampled tokens; returns the stop string that matched, if one did.

        `stop_terminated`: the last token is a stop token (EOS or one of stop_token_ids) that ended
        the sequence; its text is left out unless include_stop_str_in_output, as vLLM does.
        """
        if self.finished or self.stop_string is not None or not new_token_ids:
            return None
        self.num_output_tokens += len(new_token_ids)
        if stop_terminated and not self._include_stop:
            new_token_ids = new_token_ids[:-1]

        if self._deferred:
            self._ids.extend(new_token_ids)  # decoded by finish(), in one window
            return None
        if self._min_tokens:
            # Text from the first min_tokens outputs cannot end a sequence with a stop string.
            num_protected = max(
                0, min(len(new_token_ids), self._min_tokens - (self.num_output_tokens - len(new_token_ids)))
            )
            if num_protected:
                self._decode(new_token_ids[:num_protected])
                new_token_ids = new_token_ids[num_protected:]
        if not self._stop:  # the common case: nothing to search (_check_stop would return None)
            if new_token_ids:
                self._decode(new_token_ids)
            return None
        check_from = len(self._text)
        if new_token_ids:
            self._decode(new_token_ids)
        return self._check_stop(check_from)

    def finish(self) -> str | None:
        """The sequence ended (any reason): flush characters held back, including a trailing
        incomplete character (as U+FFFD, like tokenizer.decode). Returns a stop string if the flushed
        text completed one."""
        if self.finished:
            return None
        stop = None
        if self.stop_string is None and self._read_offset < len(self._ids):
            check_from = len(self._text)
            self._decode([], flush=True)
            stop = self._check_stop(check_from)
        self.finished = True
        return stop

    def get_next_delta(self) -> str:
        """Text not returned before; the joined deltas always equal output_text."""
        text = self._text
        # _visible_end(), inlined: this runs for every stream every step.
        if self._holdback == 0 or self.finished or self.stop_string is not None:
            end = len(text)
        else:
            end = max(len(text) - self._holdback, 0)
        if end <= self._sent:
            return ""
        delta = text[self._sent : end]
        self._sent = end
        return delta

    # ------------------------------------------------------------------ internals
    def _visible_end(self) -> int:
        if self.finished or self.stop_string is not None:
            return len(self._text)
        return max(len(self._text) - self._holdback, 0)

    def _decode_ids(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode(self, new_token_ids: list[int], flush: bool = False) -> None:
        ids = self._ids
        ids.extend(new_token_ids)
        stream = self._stream
        if stream is not None and not flush:
            # One id as an int: the stream takes it in half the time of a one-element list.
            chunk = stream.step(self._backend, new_token_ids[0] if len(new_token_ids) == 1 else new_token_ids)
            if chunk is None:
                return  # an incomplete character, or only skipped special tokens so far
            self._text += chunk
            self._advance_window()
            return
        new_text = self._decode_ids(ids[self._prefix_offset :])
        if new_text.endswith(_REPLACEMENT_CHAR) and not flush:
            return  # a character is still incomplete: wait for the tokens that finish it
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._prefix_text = self._decode_ids(ids[self._prefix_offset : self._read_offset])
        if len(new_text) <= len(prefix_text):
            return  # e.g. only skipped special tokens so far
        self._text += new_text[len(prefix_text) :]
        self._advance_window()

    def _advance_window(self) -> None:
        """The window's text was emitted: the next window starts where this one's new tokens did."""
        ids = self._ids
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        self._prefix_text = None
        if self._prefix_offset > _TRIM_THRESHOLD:
            del ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _check_stop(self, check_from: int) -> str | None:
        """Search text added after `check_from` (plus the overlap a match may start in); on a match,
        cut the text there (the earliest match wins) and return the stop string."""
        if not self._stop or len(self._text) <= check_from or self.num_output_tokens <= self._min_tokens:
            return None
        best_idx, best = -1, None
        for s in self._stop:
            idx = self._text.find(s, max(check_from - len(s) + 1, 0))
            if idx != -1 and (best is None or idx < best_idx):
                best_idx, best = idx, s
        if best is None:
            return None
        self._text = self._text[: best_idx + len(best) if self._include_stop else best_idx]
        self.stop_string = best
        return best
