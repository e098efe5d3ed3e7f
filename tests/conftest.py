"""Shared fixtures: tiny checkpoints of every supported family, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny_models import FAMILIES, build_model, build_tokenizer

# Under pytest-xdist (`make test`) each worker gets its share of the cores for torch's own threads:
# workers x threads above the core count only makes every worker wait on the others. The servers and
# scripts the tests start inherit the same count (OMP_NUM_THREADS), so they sum as the test's own would.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
