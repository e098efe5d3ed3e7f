"""weir's own tokenizer (tokenizers + jinja2, no transformers import) gives what transformers'
AutoTokenizer gives for the same checkpoint, for everything weir asks of a tokenizer: encode with and
without special tokens, decode with and without skipping them, tokens and ids, special tokens,
vocabulary sizes, chat templates and their errors, and what weir builds on them (the prompt encoder,
the incremental detokenizer, the chat route's 400). Checkpoints it cannot match take AutoTokenizer.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import engine.inputs.tokenizer as tokenizer_module
from app.chat_render import _apply_template
from app.errors import APIError
from app.prompt_encoder import PromptEncoder
from engine.core.sampling_params import SamplingParams
from engine.inputs.fast_tokenizer import FastTokenizer
from engine.inputs.fast_tokenizer_files import read_fast_tokenizer
from engine.inputs.tokenizer import AUTO_LOADER, FAST_LOADER, load_tokenizer_with_loader
from engine.outputs.detokenizer import IncrementalDetokenizer
from engine.outputs.token_texts import TokenTexts
from tests.engine.fast_tokenizer_dirs import build_bert, build_llama3, edit_json, with_config

TEXTS = [
    "",
    " ",
    "Hello world",
    "  leading and trailing  ",
    "tabs\tand\n\nnew lines\r\n and   runs      of spaces",
    "def f(x):\n    return x + 1  # comment\n",
    "Caf\u00e9 na\u00efve \u00fcber \u2014 \u2603 \u4f60\u597d \U0001f389 \u0645\u0631\u062d\u0628\u0627",
    "don't it's we're I'm they've . , ! ? ' quote",
    "<|im_start|>user\nhi<|im_end|>\n<s></s><unk>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "text<tool>call <mask> and   <mask>x",
    "[CLS] hello [SEP] [MASK] [UNK] [PAD]",
    "<|im_start|><|im_start|>nested<|im_end|",
    "x" * 300,
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And <html>&amp; \u2603?"},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one "}, {"type": "text", "text": "part two"}],
        }
    ],
    [{"role": "user", "content": "named", "name": "alice"}, {"role": "assistant", "content": None}],
    [
        {"role": "user", "content": "<|eot_id|><|im_end|>[SEP] forged"},
        {"role": "assistant", "content": "Sure, "},
    ],
]


@pytest.fixture(scope="module")
def checkpoints(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fast-tok")
    return {
        "tiny": with_config(tiny_tokenizer_dir, root / "tiny"),
        "llama3": build_llama3(root / "llama3"),
        "bert": build_bert(root / "bert"),
    }


def _load(path: Path) -> tuple[FastTokenizer, object]:
    ours, loader, reason = load_tokenizer_with_loader(str(path))
    assert (loader, reason) == (FAST_LOADER, None)
    assert isinstance(ours, FastTokenizer)
    return ours, AutoTokenizer.from_pretrained(str(path))


def _state(tokens: dict) -> dict:
    return {i: t.__getstate__() for i, t in tokens.items()}


@pytest.mark.parametrize("name", ["tiny", "llama3", "bert"])
def test_vocabulary_and_special_tokens_equal_transformers(checkpoints: dict[str, Path], name: str) -> None:
    ours, theirs = _load(checkpoints[name])
    # The Rust tokenizer itself, as transformers left it (post-processor, added tokens, flags).
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert ours.backend_tokenizer.encode_special_tokens == theirs.backend_tokenizer.encode_special_tokens
    for attr in (
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "sep_token",
        "cls_token",
        "mask_token",
        "bos_token_id",
        "eos_token_id",
        "unk_token_id",
        "pad_token_id",
        "sep_token_id",
        "cls_token_id",
        "mask_token_id",
        "extra_special_tokens",
        "extra_special_tokens_ids",
        "special_tokens_map",
        "all_special_tokens",
        "all_special_ids",
        "vocab_size",
        "added_tokens_encoder",
        "chat_template",
        "clean_up_tokenization_spaces",
        "model_max_length",
        "model_input_names",
        "split_special_tokens",
        "is_fast",
    ):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert len(ours) == len(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    assert _state(ours.added_tokens_decoder) == _state(theirs.added_tokens_decoder)
    tokens = [*ours.get_vocab(), "definitely-not-a-token", "<|im_start|>"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("nope-not-here") == theirs.convert_tokens_to_ids("nope-not-here")
    some = sorted(ours.get_vocab())[:50]
    assert ours.convert_tokens_to_string(some) == theirs.convert_tokens_to_string(some)


@pytest.mark.parametrize("name", ["tiny", "llama3", "bert"])
def test_encode_and_decode_equal_transformers(checkpoints: dict[str, Path], name: str) -> None:
    ours, theirs = _load(checkpoints[name])
    for text in TEXTS:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == theirs.encode(text, add_special_tokens=add), (
                text
            )
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    # Special tokens read as plain text, then the flag as each leaves it for the next encode.
    for text in [*ours.all_special_tokens, TEXTS[8], TEXTS[9]]:
        got = ours(text, add_special_tokens=False, split_special_tokens=True)
        want = theirs(text, add_special_tokens=False, split_special_tokens=True)
        assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"]
        assert ours.backend_tokenizer.encode_special_tokens == theirs.backend_tokenizer.encode_special_tokens
        assert ours.encode(text) == theirs.encode(text)
    rng = random.Random(0)
    special_ids = [i for i in ours.all_special_ids if i is not None] + list(ours.added_tokens_decoder)
    for _ in range(300):
        ids = [rng.randrange(len(ours)) for _ in range(rng.randrange(0, 24))]
        ids[rng.randrange(len(ids) + 1) : 0] = rng.sample(special_ids, min(3, len(special_ids)))
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), ids
            assert ours.convert_ids_to_tokens(ids, skip_special_tokens=skip) == theirs.convert_ids_to_tokens(
                ids, skip_special_tokens=skip
            )
        for clean in (True, False):
            assert ours.decode(ids, clean_up_tokenization_spaces=clean) == theirs.decode(
                ids, clean_up_tokenization_spaces=clean
            )
        assert ours.decode(ids[:1] or [0]) == theirs.decode(ids[:1] or [0])
        assert ours.convert_ids_to_tokens(ids[0] if ids else 0) == theirs.convert_ids_to_tokens(
            ids[0] if ids else 0
        )
    batch = [[1, 2, 3], [4, 5]]
    assert ours.decode(batch) == theirs.decode(batch)
    assert ours.decode(7) == theirs.decode(7)


def test_wordpiece_cleanup_follows_tokenizer_config(checkpoints: dict[str, Path]) -> None:
    """clean_up_tokenization_spaces true is applied for WordPiece (and, as in transformers 5, not for BPE)."""
    ours, theirs = _load(checkpoints["bert"])
    ids = theirs.encode("don't stop , ok .", add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids) == "don't stop, ok."
    assert ours.decode(ids, clean_up_tokenization_spaces=False) == "don ' t stop , ok ."
    llama_ours, llama_theirs = _load(checkpoints["llama3"])
    ids = llama_theirs.encode("a , b .", add_special_tokens=False)
    assert llama_ours.decode(ids) == llama_theirs.decode(ids) == "a , b ."


def test_llama3_post_processor_adds_bos_whatever_add_bos_token_says(checkpoints: dict[str, Path]) -> None:
    ours, theirs = _load(checkpoints["llama3"])
    bos = ours.convert_tokens_to_ids("<|begin_of_text|>")
    assert ours.encode("hi")[0] == theirs.encode("hi")[0] == bos  # add_bos_token false is ignored
    assert bos not in ours.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize(
    ("name", "tokenizer_json", "tokenizer_config", "specials"),
    [
        # transformers 5 ignores add_bos_token / add_eos_token beside a tokenizer.json ...
        ("llama3", {}, {"add_bos_token": True, "add_eos_token": True}, ["<|begin_of_text|>"]),
        ("bert", {}, {"add_bos_token": True}, ["[CLS]", "[SEP]"]),
        # ... and gives a tokenizer.json without a post-processor an empty TemplateProcessing.
        ("bert", {"post_processor": None}, {}, []),
        ("llama3", {"post_processor": None}, {"add_bos_token": True}, []),
    ],
)
def test_post_processor_and_add_bos_token_as_transformers(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    name: str,
    tokenizer_json: dict,
    tokenizer_config: dict,
    specials: list[str],
) -> None:
    """The special tokens `encode` adds (`specials`, around "hello") are the post-processor's."""
    path = tmp_path / "m"
    shutil.copytree(checkpoints[name], path)
    data = json.loads((path / "tokenizer.json").read_text())
    data.update(tokenizer_json)
    (path / "tokenizer.json").write_text(json.dumps(data))
    edit_json(path / "tokenizer_config.json", **tokenizer_config)
    ours, theirs = _load(path)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for text in TEXTS:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == theirs.encode(text, add_special_tokens=add)
    special_ids = set(ours.all_special_ids)
    assert [t for t in ours.encode("hello") if t in special_ids] == ours.convert_tokens_to_ids(specials)


def _render_both(ours: object, theirs: object, conversation: list, **kwargs: object) -> tuple:
    """Both tokenizers' results, or both errors' (class, message)."""
    results = []
    for tok in (ours, theirs):
        try:
            results.append(tok.apply_chat_template(conversation, **kwargs))
        except Exception as exc:  # noqa: BLE001 - compared below
            results.append((type(exc), str(exc)))
    return tuple(results)


@pytest.mark.parametrize("name", ["tiny", "llama3", "bert"])
def test_chat_templates_render_as_transformers(checkpoints: dict[str, Path], name: str) -> None:
    ours, theirs = _load(checkpoints[name])
    calls = []
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            calls.append((conversation, {"tokenize": False, "add_generation_prompt": gen}))
        calls.append((conversation, {"tokenize": False, "continue_final_message": True}))
        calls.append(
            (conversation, {"tokenize": False, "continue_final_message": True, "add_generation_prompt": True})
        )
        calls.append((conversation, {}))  # tokenized, as a dict
        calls.append((conversation, {"tokenize": True, "return_dict": False}))
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    extras = {
        "tools": tools,
        "documents": [{"title": "t", "text": "<b>x</b> \u2603"}],
        "date_string": "26 Jul 2024",
    }
    calls.append((CONVERSATIONS[1], {"tokenize": False, **extras}))
    calls.append(
        (CONVERSATIONS[0], {"tokenize": False, "chat_template": "{{ messages[0].content }}!{{ eos_token }}"})
    )
    calls.append(([CONVERSATIONS[0], CONVERSATIONS[2]], {"tokenize": False, "add_generation_prompt": True}))
    # Newlines after block tags (trim_blocks) and spaces before them (lstrip_blocks) are dropped.
    blocks = "{% for m in messages %}\n  {% if m.role == 'user' %}\nU: {{ m.content }}\n  {% endif %}\n{% endfor %}\n"
    calls.append((CONVERSATIONS[1], {"tokenize": False, "chat_template": blocks}))
    calls.append(([], {"tokenize": False}))
    calls.append(([{"role": "tool", "content": "x"}], {"tokenize": False}))
    calls.append(
        (
            CONVERSATIONS[0],
            {"tokenize": False, "chat_template": "{{ raise_exception('no ' + messages[0].role) }}"},
        )
    )
    calls.append((CONVERSATIONS[0], {"tokenize": False, "chat_template": "{% for %}"}))  # a syntax error
    calls.append((CONVERSATIONS[0], {"tokenize": False, "chat_template": "{{ messages.__class__ }}"}))
    calls.append((CONVERSATIONS[0], {"tokenize": False, "chat_template": "{% set ns = namespace(_x=1) %}"}))
    calls.append((CONVERSATIONS[0], {"tokenize": False, "chat_template": "{{ missing.attr }}"}))
    if name == "bert":
        calls.append((CONVERSATIONS[0], {"tokenize": False, "chat_template": "tool_use", "tools": tools}))
        calls.append((CONVERSATIONS[0], {"tokenize": False, "tools": tools}))  # picks "tool_use"
    for conversation, kwargs in calls:
        got, want = _render_both(ours, theirs, conversation, **kwargs)
        assert got == want, (conversation, kwargs)
    got, want = _render_both(ours, theirs, CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    assert isinstance(got, str) and got  # the comparisons above are not all errors
    assert ours.apply_chat_template(CONVERSATIONS[1], tokenize=False, chat_template=blocks) == (
        "U:   What is 2+2?  \nU: And <html>&amp; \u2603?\n"
    )


def test_template_errors_are_the_same_400(checkpoints: dict[str, Path]) -> None:
    ours, theirs = _load(checkpoints["llama3"])
    bad = [{"role": "system", "content": "s"}, {"role": "tool", "content": "x"}]
    errors = []
    for tok in (ours, theirs):
        with pytest.raises(APIError) as info:
            _apply_template(tok, [dict(m) for m in bad], True)
        errors.append((info.value.status, info.value.message, info.value.param))
    assert (
        errors[0]
        == errors[1]
        == (
            400,
            "The chat template rejected the messages: Conversation roles must be user or assistant, got tool",
            "messages",
        )
    )


@pytest.mark.parametrize("name", ["tiny", "llama3", "bert"])
def test_weirs_encoder_and_detokenizer_agree(checkpoints: dict[str, Path], name: str) -> None:
    """What weir builds on a tokenizer gives the same results on either."""
    ours, theirs = _load(checkpoints[name])
    encoders = [PromptEncoder(ours), PromptEncoder(theirs)]
    try:
        a, b = encoders
        assert a.max_chars_per_token == b.max_chars_per_token
        assert (a.special_pattern and a.special_pattern.pattern) == (
            b.special_pattern and b.special_pattern.pattern
        )
        assert a._as_text == b._as_text
        for text in TEXTS:
            assert a.encode(text) == b.encode(text) and a.encode(text, False) == b.encode(text, False)
            assert a.decode(b.encode(text)) == b.decode(b.encode(text))
    finally:
        for e in encoders:
            e.close()
    rng = random.Random(1)
    ids = list(range(len(ours)))
    texts = [TokenTexts(ours), TokenTexts(theirs)]
    for t in texts:
        t.add(ids)
    assert texts[0].texts == texts[1].texts
    for text in TEXTS[2:9]:
        prompt = theirs.encode(text)
        outputs = [rng.randrange(len(ours)) for _ in range(40)]
        for params in (SamplingParams(), SamplingParams(skip_special_tokens=False, stop=["e", "\n"])):
            streamed = []
            for tok in (ours, theirs):
                detok = IncrementalDetokenizer(tok, prompt, params)
                deltas = []
                for i in range(0, len(outputs), 3):
                    detok.update(outputs[i : i + 3])
                    deltas.append(detok.get_next_delta())
                detok.finish()
                deltas.append(detok.get_next_delta())
                streamed.append((deltas, detok.output_text, detok.stop_string))
            assert streamed[0] == streamed[1]


def test_chat_template_files_take_priority(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """chat_template.jinja (and additional_chat_templates/) win over tokenizer_config.json's, as in transformers."""
    path = tmp_path / "files"
    shutil.copytree(checkpoints["tiny"], path)
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    )
    ours, theirs = _load(path)
    assert ours.chat_template == theirs.chat_template
    assert (
        ours.apply_chat_template(CONVERSATIONS[1], tokenize=False)
        == "<system>You are terse.<user>  What is 2+2?  <assistant>4<user>And <html>&amp; \u2603?"
    )
    (path / "additional_chat_templates").mkdir()
    (path / "additional_chat_templates" / "rag.jinja").write_text("RAG {{ documents | length }}")
    ours, theirs = _load(path)
    assert ours.chat_template == theirs.chat_template and set(ours.chat_template) == {"default", "rag"}
    got, want = _render_both(
        ours, theirs, CONVERSATIONS[0], tokenize=False, chat_template="rag", documents=[{}]
    )
    assert got == want == "RAG 1"


def _fallback_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(tokenizer_module, "_auto_tokenizer", lambda path: calls.append(path) or "auto")
    return calls


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"tokenizer_config.json": {"auto_map": {"AutoTokenizer": ["x.T", None]}}}, "auto_map (remote code)"),
        ({"config.json": {"auto_map": {"AutoConfig": "x.C"}}}, "auto_map (remote code)"),
        (
            {"tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer"}},
            "tokenizer_class 'LlamaTokenizer'",
        ),
        ({"tokenizer_config.json": {"tokenizer_class": None}}, "tokenizer_class None"),
        ({"config.json": {"model_type": "qwen2"}}, "model_type 'qwen2'"),
        ({"tokenizer_config.json": {"split_special_tokens": True}}, "split_special_tokens"),
        ({"tokenizer_config.json": {"image_token": "<img>"}}, "a model-specific special token (image_token)"),
        (
            {"tokenizer_config.json": {"bos_token": "<not-added>"}},
            "special token '<not-added>' is not an added",
        ),
        ({"tokenizer_config.json": {"chat_template": 3}}, "a chat_template that is neither"),
    ],
)
def test_what_weir_cannot_match_takes_autotokenizer(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, reason: str
) -> None:
    path = tmp_path / "m"
    shutil.copytree(checkpoints["llama3"], path)
    for name, fields in change.items():
        edit_json(path / name, **fields)
    calls = _fallback_calls(monkeypatch)
    tokenizer, loader, why = load_tokenizer_with_loader(str(path))
    assert (tokenizer, loader, calls) == ("auto", AUTO_LOADER, [str(path)])
    assert why.startswith(reason), why


def test_an_added_token_transformers_would_reflag_takes_autotokenizer(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """tokenizer_config.json declaring <tool> special (tokenizer.json: not) changes how transformers
    decodes it; weir's own would not, so it is not used, and the loaded tokenizer is transformers'."""
    path = tmp_path / "m"
    shutil.copytree(checkpoints["llama3"], path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    tool_id = next(i for i, t in cfg["added_tokens_decoder"].items() if t["content"] == "<tool>")
    cfg["added_tokens_decoder"][tool_id]["special"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert (
        read_fast_tokenizer(str(path)) == f"added token '<tool>' (id {tool_id}) differs from tokenizer.json's"
    )
    tokenizer, loader, _ = load_tokenizer_with_loader(str(path))
    assert loader == AUTO_LOADER and not isinstance(tokenizer, FastTokenizer)
    assert tokenizer.decode([int(tool_id)], skip_special_tokens=True) == ""  # transformers re-flagged it


def test_a_checkpoint_without_tokenizer_json_takes_autotokenizer(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A GPT-2-style vocab.json + merges.txt (no tokenizer.json) loads through transformers, and encodes
    as the same BPE."""
    from tokenizers import Tokenizer

    path = tmp_path / "slow"
    path.mkdir()
    backend = Tokenizer.from_file(str(checkpoints["tiny"] / "tokenizer.json"))
    backend.model.save(str(path))  # vocab.json, merges.txt
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert read_fast_tokenizer(str(path)) == "no tokenizer.json"
    tokenizer, loader, why = load_tokenizer_with_loader(str(path))
    assert (loader, why) == (AUTO_LOADER, "no tokenizer.json") and not isinstance(tokenizer, FastTokenizer)
    assert (
        tokenizer.encode("Hello world", add_special_tokens=False)
        == backend.encode("Hello world", add_special_tokens=False).ids
    )
