"""load_tokenizer gives AutoTokenizer's tokenizer, or weir's own where that reads the same checkpoint
(engine/inputs/fast_tokenizer_files.py), and its shortcut past the model's config class for the rest
gives AutoTokenizer's own tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.config import default_model_dir
from engine.inputs.fast_tokenizer import FastTokenizer
from engine.inputs.tokenizer import AUTO_LOADER, FAST_LOADER, _declared_config, load_tokenizer_with_loader

TEXT = "def f(x):\n    return x + 1  # <|im_start|> héllo wörld\n\n"


def _same_tokenizer(path: Path) -> str:
    """The loader used, once its tokenizer proved equal to AutoTokenizer's."""
    ours, loader, _ = load_tokenizer_with_loader(str(path))
    theirs = AutoTokenizer.from_pretrained(str(path))
    if loader == AUTO_LOADER:
        assert type(ours) is type(theirs)
    else:
        assert type(ours) is FastTokenizer
    assert ours.encode(TEXT) == theirs.encode(TEXT)
    assert ours.decode(theirs.encode(TEXT)) == theirs.decode(theirs.encode(TEXT))
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.chat_template == theirs.chat_template
    return loader


def test_default_model_tokenizer_equals_autotokenizer() -> None:
    assert _same_tokenizer(default_model_dir()) == FAST_LOADER  # read without transformers
    assert "config" in _declared_config(str(default_model_dir()))  # the shortcut, for AutoTokenizer's path


def test_every_tiny_family_tokenizer_equals_autotokenizer(tiny_model_dirs: dict[str, Path]) -> None:
    loaders = {}
    for family, path in tiny_model_dirs.items():
        assert "config" in _declared_config(str(path))  # the tests' tokenizer names its class
        loaders[family] = _same_tokenizer(path)
    # weir reads the tokenizer files itself only for the model types fast_tokenizer_files verified
    # (VERIFIED_MODEL_TYPES: Llama, Mistral, Mixtral, Qwen3); every other family's tokenizer, the Qwen2
    # ones included (transformers 5 loads them with its own Qwen2Tokenizer class, which rebuilds the
    # pre-tokenizer), is left to transformers.
    fast = (
        "llama",
        "llama3_scaled",
        "llama_tied",
        "llama_dynamic",
        "mistral",
        "mistral_window",
        "mixtral",
        "qwen3",
    )
    assert loaders == {f: FAST_LOADER if f in fast else AUTO_LOADER for f in tiny_model_dirs}


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer_config": {"auto_map": {"AutoTokenizer": ["x.T", None]}}},
        {"config": {"auto_map": {"AutoConfig": "x.C"}}},
        {"tokenizer_config": {"tokenizer_class": None}},
        {"config": {"model_type": None}},
    ],
)
def test_remote_code_or_an_undeclared_class_takes_autotokenizers_own_path(
    tmp_path: Path, change: dict
) -> None:
    shutil.copytree(default_model_dir(), tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    for name, fields in change.items():
        f = tmp_path / "m" / f"{name}.json"
        data = json.loads(f.read_text())
        for key, value in fields.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        f.write_text(json.dumps(data))
    assert _declared_config(str(tmp_path / "m")) == {}


def test_a_directory_without_the_files_takes_autotokenizers_own_path(tmp_path: Path) -> None:
    assert _declared_config(str(tmp_path)) == {}
    assert _declared_config("org/name-on-a-hub") == {}
