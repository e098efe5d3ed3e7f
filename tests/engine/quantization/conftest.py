"""Tiny Llamas wide enough for every group size and FP8 block, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.quantization.checkpoints import build_wide_llama


@pytest.fixture(scope="session")
def wide_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return build_wide_llama(tmp_path_factory.mktemp("wide") / "llama", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def wider_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """hidden 256: q, k and v outputs are multiples of 128, as FP8 [128, 128] blocks need."""
    return build_wide_llama(tmp_path_factory.mktemp("wider") / "llama", tiny_tokenizer_dir, hidden=256)
