"""Run the Triton kernels in this pytest process: on a GPU, or on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before triton itself is first imported (triton.language's own jit helpers
such as tl.sum are decorated then), so a test module imports this first, above anything that could
pull triton in. If something in this process imported triton earlier without it, the kernels cannot
be interpreted here: such a module's tests are skipped in-process (`in_process`) and its
`test_in_fresh_interpreter_process` (see `rerun_in_fresh_process`) reruns the whole module in a
subprocess with the variable set, failing if that run fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton imported earlier in this process in compiled mode, on a machine without a GPU
TRITON_UNUSABLE_HERE = (
    DEVICE == "cpu" and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
)
if DEVICE == "cpu" and not TRITON_UNUSABLE_HERE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

in_process = pytest.mark.skipif(
    TRITON_UNUSABLE_HERE, reason="triton was imported before TRITON_INTERPRET: run in a subprocess instead"
)
only_in_subprocess = pytest.mark.skipif(not TRITON_UNUSABLE_HERE, reason="the kernels run in this process")


def rerun_in_fresh_process(test_file: str) -> None:
    """Run every test of `test_file` in a fresh pytest process with TRITON_INTERPRET=1."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file).resolve())],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
