"""Shared fixtures: tiny checkpoints of every supported family, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import FAMILIES, build_model, build_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """family name -> checkpoint directory, for every family in tests.tiny_models.FAMILIES."""
    root = tmp_path_factory.mktemp("models")
    return {f: build_model(f, root / f, tiny_tokenizer_dir) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]
