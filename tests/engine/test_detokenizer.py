"""Streaming detokenization as a client sees it: whole characters only, deltas that add up to the
final text, stop strings cut exactly (even across tokens), special tokens skipped on request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.core.sampling_params import SamplingParams
from engine.outputs.detokenizer import IncrementalDetokenizer

PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def byte_tokens(tok, text: str) -> list[int]:
    """One token per UTF-8 byte, so every multi-byte character is split across tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    ids = tok.convert_tokens_to_ids([b2u[b] for b in text.encode("utf-8")])
    assert tok.unk_token_id not in ids
    return ids


def stream(tok, output_ids: list[int], prompt: str = PROMPT, **params):
    """Feed tokens one by one, as the engine does; returns (deltas per step incl. the final flush,
    the detokenizer, the step index at which a stop string matched or None)."""
    params.setdefault("max_tokens", None)
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), SamplingParams(**params))
    deltas, stopped_at = [], None
    for i, t in enumerate(output_ids):
        if detok.update([t]) is not None:
            stopped_at = i
            deltas.append(detok.get_next_delta())
            break
        deltas.append(detok.get_next_delta())
    detok.finish()
    deltas.append(detok.get_next_delta())
    return deltas, detok, stopped_at


MULTIBYTE = "Caf\u00e9 \u2603 \u4f60\u597d na\u00efve"


@pytest.mark.parametrize("split", ["bytes", "natural"])
def test_multibyte_characters_never_appear_half(tok, split: str) -> None:
    ids = byte_tokens(tok, MULTIBYTE) if split == "bytes" else tok.encode(MULTIBYTE)
    # The natural encoding must split some character too, or this test would prove nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, detok, _ = stream(tok, ids)
    for d in deltas:
        assert "\ufffd" not in d
        d.encode("utf-8")  # no lone surrogates either
    assert "".join(deltas) == MULTIBYTE == detok.output_text
    # Every character arrives in one piece: each delta is a run of whole characters of the text.
    assert "".join(deltas[:-1]) == MULTIBYTE
    assert "" in deltas[:-1]  # some steps had to wait for the rest of a character


@pytest.mark.parametrize(
    "text",
    [
        "Hello world. The quick brown fox jumps over the lazy dog.",
        "Return a new ordered dictionary.\n\n  indented   spaces\ttab",
        MULTIBYTE + " and more text after it",
    ],
)
def test_joined_deltas_equal_full_decode(tok, text: str) -> None:
    ids = tok.encode(text)
    deltas, detok, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == detok.output_text == text


def test_several_tokens_per_update_and_empty_prompt(tok) -> None:
    ids = tok.encode(MULTIBYTE + " hello")
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    out = []
    for i in range(0, len(ids), 3):
        detok.update(ids[i : i + 3])
        out.append(detok.get_next_delta())
    detok.finish()
    out.append(detok.get_next_delta())
    assert all("\ufffd" not in d for d in out)
    assert "".join(out) == tok.decode(ids)


def test_trailing_incomplete_character_is_flushed_at_finish(tok) -> None:
    ids = tok.encode("abc") + byte_tokens(tok, "\u2603")[:2]
    deltas, detok, _ = stream(tok, ids)
    assert "\ufffd" not in "".join(deltas[:-1])
    assert "".join(deltas) == tok.decode(ids) == detok.output_text
    assert detok.output_text.startswith("abc") and detok.output_text.endswith("\ufffd")


def _boundary_stop(tok, ids: list[int]) -> tuple[int, str]:
    """A stop string that spans the boundary between two tokens of `ids` (index of the 2nd token)."""
    for i in range(3, len(ids) - 2):
        left, right = tok.decode(ids[i - 1 : i]), tok.decode(ids[i : i + 1])
        if len(left) >= 2 and len(right) >= 2 and left.isascii() and right.isascii():
            return i, left[-2:] + right[:2]
    raise AssertionError("no suitable boundary")


TEXT = "The quick brown fox jumps over the lazy dog, then the dog sleeps."


def test_stop_string_spanning_two_tokens_is_found_and_cut(tok) -> None:
    ids = tok.encode(TEXT)
    i, stop = _boundary_stop(tok, ids)
    assert TEXT.find(stop) == len(tok.decode(ids[:i])) - 2  # first occurrence is the one spanning
    deltas, detok, stopped_at = stream(tok, ids, stop=["never", stop])
    assert stopped_at == i
    assert detok.stop_string == stop
    expected = TEXT[: TEXT.find(stop)]
    assert detok.output_text == expected
    assert "".join(deltas) == expected  # nothing after (or of) the stop string was ever streamed


def test_include_stop_str_in_output(tok) -> None:
    ids = tok.encode(TEXT)
    i, stop = _boundary_stop(tok, ids)
    deltas, detok, stopped_at = stream(tok, ids, stop=[stop], include_stop_str_in_output=True)
    expected = TEXT[: TEXT.find(stop) + len(stop)]
    assert stopped_at == i
    assert detok.output_text == expected == "".join(deltas)


def test_stop_string_in_the_very_first_token(tok) -> None:
    ids = tok.encode(TEXT)
    first = tok.decode(ids[:1])
    deltas, detok, stopped_at = stream(tok, ids, stop=[first])
    assert stopped_at == 0
    assert detok.output_text == "" and "".join(deltas) == ""
    deltas, detok, _ = stream(tok, ids, stop=[first], include_stop_str_in_output=True)
    assert detok.output_text == first == "".join(deltas)


def test_earliest_stop_string_wins_and_later_tokens_are_ignored(tok) -> None:
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["lazy", "quick"]))
    assert detok.update(ids) == "quick"
    assert detok.output_text == "The "
    assert detok.update(tok.encode(" more")) is None
    detok.finish()
    assert detok.get_next_delta() == "The " and detok.output_text == "The "


def test_holdback_only_while_running(tok) -> None:
    ids = tok.encode("Hello world. The quick")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["zzzzz"]))
    detok.update(ids)
    streamed = detok.get_next_delta()
    assert streamed == "Hello world. The q"  # the last 4 characters could begin "zzzzz"
    assert detok.output_text == streamed
    detok.finish()
    assert detok.get_next_delta() == "uick"
    assert detok.output_text == "Hello world. The quick"


def test_stop_strings_ignored_during_min_tokens(tok) -> None:
    ids = tok.encode("ab ab ab ab")
    assert tok.decode(ids[:1]) == "ab"  # the first token alone already holds the stop string
    _, detok, stopped_at = stream(tok, ids, prompt="", stop=["ab"])
    assert stopped_at == 0 and detok.output_text == ""
    # With min_tokens=1 the first token's text cannot stop; the next complete "ab" does.
    _, detok, stopped_at = stream(tok, ids, prompt="", stop=["ab"], min_tokens=1)
    first_after = "ab ab ab ab".find("ab", 1)
    assert stopped_at == len(tok.encode("ab ab")) - 1
    assert detok.output_text == "ab ab ab ab"[:first_after]


def test_stop_terminated_token_text_is_left_out(tok) -> None:
    ids = tok.encode("Hello world")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop_token_ids=[ids[-1]]))
    detok.update(ids[:-1])
    detok.update(ids[-1:], stop_terminated=True)
    detok.finish()
    assert detok.output_text == tok.decode(ids[:-1])
    assert detok.num_output_tokens == len(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok, skip: bool) -> None:
    ids = (
        tok.encode("Hi")
        + [tok.convert_tokens_to_ids("<|im_end|>")]
        + tok.encode(" there")
        + [tok.eos_token_id]
    )
    deltas, detok, _ = stream(tok, ids, skip_special_tokens=skip)
    expected = "Hi there" if skip else "Hi<|im_end|> there</s>"
    assert "".join(deltas) == detok.output_text == expected == tok.decode(ids, skip_special_tokens=skip)


def test_window_stays_small_on_long_outputs(tok) -> None:
    ids = tok.encode(TEXT) * 200
    deltas, detok, _ = stream(tok, ids)
    assert "".join(deltas) == TEXT * 200
    assert len(detok._ids) <= 600  # old tokens are trimmed, not re-decoded every step


class _CountingBackend:
    """The fast tokenizer's Rust backend, counting decode calls."""

    def __init__(self, backend) -> None:
        self.backend, self.calls = backend, 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.calls += 1
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def _deferred_text(tok, ids: list[int], stop_last: bool = False, **params) -> tuple[str, int]:
    params.setdefault("max_tokens", None)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), SamplingParams(**params), deferred=True)
    counting = detok._backend = _CountingBackend(detok._backend)
    for i, t in enumerate(ids):
        assert detok.update([t], stop_terminated=stop_last and i == len(ids) - 1) is None
    assert counting.calls == 0 and detok.output_text == ""  # nothing decoded while it runs
    detok.finish()
    assert counting.calls <= 2  # the window and its prompt tail, once
    return detok.output_text, detok.num_output_tokens


@pytest.mark.parametrize(
    "case", ["bytes", "natural", "trailing", "special", "special-kept", "stop-token", "long"]
)
def test_deferred_text_is_the_streamed_text(tok, case: str) -> None:
    """A final-only sequence without stop strings decodes once, at finish: the same text, character for
    character, as the step-by-step path in every case above (split characters, a trailing incomplete
    one, special tokens skipped or kept, a stop token left out, a window trimmed on a long output)."""
    params: dict = {}
    stop_last = False
    if case == "bytes":
        ids = byte_tokens(tok, MULTIBYTE)
    elif case == "natural":
        ids = tok.encode(MULTIBYTE + " and more")
    elif case == "trailing":
        ids = tok.encode("abc") + byte_tokens(tok, "\u2603")[:2]
    elif case.startswith("special"):
        ids = tok.encode("Hi") + [tok.convert_tokens_to_ids("<|im_end|>")] + tok.encode(" there")
        params["skip_special_tokens"] = case == "special"
    elif case == "stop-token":
        ids = tok.encode("Hello world")
        params["stop_token_ids"] = [ids[-1]]
        stop_last = True
    else:
        ids = tok.encode(TEXT) * 60
    streamed = IncrementalDetokenizer(tok, tok.encode(PROMPT), SamplingParams(max_tokens=None, **params))
    for i, t in enumerate(ids):
        streamed.update([t], stop_terminated=stop_last and i == len(ids) - 1)
    streamed.finish()
    text, count = _deferred_text(tok, ids, stop_last, **params)
    assert text == streamed.output_text and count == streamed.num_output_tokens == len(ids)
    if case == "long":
        assert text == TEXT * 60


def test_deferred_still_searches_stop_strings(tok) -> None:
    """A stop string must be found as the text grows: with one, a deferred detokenizer decodes every step."""
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(
        tok, tok.encode(PROMPT), SamplingParams(max_tokens=None, stop=["lazy"]), deferred=True
    )
    stopped = [detok.update([t]) for t in ids]
    assert "lazy" in stopped and detok.output_text == TEXT[: TEXT.index("lazy")]


@pytest.fixture(scope="module")
def sentencepiece_tok():
    """A Llama-2-style tokenizer built here: Metaspace pieces, byte fallback for characters the vocab
    lacks (one token per UTF-8 byte), and the decoder that strips the first piece's leading space (the
    rule the decode window's context exists for)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog."] * 20, trainer)
    # The byte pieces are ordinary vocabulary, as in Llama 2's (not special: skip_special_tokens keeps them).
    spec = json.loads(trained.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"].update(byte_fallback=True, fuse_unk=True)
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("per_update", [1, 3])
def test_sentencepiece_byte_fallback_streams_whole_characters(sentencepiece_tok, per_update: int) -> None:
    """The Rust stream (DecodeStream) and the Python window give the same deltas, whole characters only,
    adding up to the full decode, the first output piece's leading space kept after the prompt."""
    tok = sentencepiece_tok
    text = "Hello caf\u00e9 \u2603 world \u4f60\u597d fox"
    prompt_ids = tok.encode("the lazy dog", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert sum(1 for i in ids if tok.convert_ids_to_tokens(i).startswith("<0x")) >= 9  # split characters

    def run(use_stream: bool) -> list[str]:
        detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(max_tokens=None))
        assert detok._stream is not None
        if not use_stream:
            detok._stream = None
        deltas = []
        for a in range(0, len(ids), per_update):
            detok.update(ids[a : a + per_update])
            deltas.append(detok.get_next_delta())
        detok.finish()
        deltas.append(detok.get_next_delta())
        return deltas

    streamed, windowed = run(True), run(False)
    assert streamed == windowed
    assert "".join(streamed) == " " + text  # after the prompt, the first piece's space is text
    assert all("\ufffd" not in d for d in streamed)
    assert tok.decode(prompt_ids + ids) == "the lazy dog " + text


def test_sentencepiece_trailing_bytes_are_flushed_at_finish(sentencepiece_tok) -> None:
    """A sequence that ends inside a character: nothing streams for its bytes while it runs, finish()
    gives what tokenizer.decode gives for them (U+FFFD for each byte-fallback piece)."""
    tok = sentencepiece_tok
    prompt_ids = tok.encode("the", add_special_tokens=False)
    ids = tok.encode("fox \u2603", add_special_tokens=False)[:-1]  # the snowman's last byte cut off
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(max_tokens=None))
    for t in ids:
        detok.update([t])
    assert detok.get_next_delta() == " fox "
    detok.finish()
    assert detok.get_next_delta() == "\ufffd\ufffd"  # the snowman's first two bytes
    assert "the" + detok.output_text == tok.decode(prompt_ids + ids) == "the fox \ufffd\ufffd"
