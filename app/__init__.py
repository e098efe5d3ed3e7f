"""weir's HTTP layer: the OpenAI-compatible server (`weir serve`). Knows nothing about tensors."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _version() -> str:
    try:
        return version("weir")
    except PackageNotFoundError:  # a source tree that is not installed: read pyproject.toml
        try:
            text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        except OSError:
            return "0+unknown"
        m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return m.group(1) if m else "0+unknown"


__version__ = _version()
