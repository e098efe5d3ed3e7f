"""load_tokenizer's shortcut past the model's config class gives AutoTokenizer's own tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.config import default_model_dir
from engine.inputs.tokenizer import _declared_config, load_tokenizer

TEXT = "def f(x):\n    return x + 1  # <|im_start|> héllo wörld\n\n"


def _same_tokenizer(path: Path) -> None:
    ours = load_tokenizer(str(path))
    theirs = AutoTokenizer.from_pretrained(str(path))
    assert type(ours) is type(theirs)
    assert ours.encode(TEXT) == theirs.encode(TEXT)
    assert ours.decode(theirs.encode(TEXT)) == theirs.decode(theirs.encode(TEXT))
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.chat_template == theirs.chat_template


def test_default_model_tokenizer_equals_autotokenizer() -> None:
    assert "config" in _declared_config(str(default_model_dir()))  # the shortcut is taken
    _same_tokenizer(default_model_dir())


def test_every_tiny_family_tokenizer_equals_autotokenizer(tiny_model_dirs: dict[str, Path]) -> None:
    for path in tiny_model_dirs.values():
        assert "config" in _declared_config(str(path))  # the tests' tokenizer names its class
        _same_tokenizer(path)


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
