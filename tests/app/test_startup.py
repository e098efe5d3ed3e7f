"""`weir serve` start-up misconfigurations end in one line on stderr that says what to change, and
no traceback; `weir --version` prints the version.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app import __version__

REPO = Path(__file__).resolve().parents[2]


def _weir(*args: str, timeout: float = 120, **weir_env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("WEIR_")} | weir_env
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def _one_line(stderr: str, after_logs: bool = False) -> str:
    """The error line; the only line on stderr unless the failure came after logging had started."""
    lines = stderr.strip().splitlines()
    assert after_logs or len(lines) == 1, stderr
    assert lines[-1].startswith("weir serve: error: ") and "Traceback" not in stderr
    return lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_device_cuda_without_cuda_is_one_line() -> None:
    r = _weir("serve", "--device", "cuda", "--port", "0")
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert "--device cpu" in line
    if torch.version.cuda is None:
        assert "CPU-only build" in line and "install a CUDA build of torch" in line
    assert r.stdout == ""  # failed before loading anything


def test_port_in_use_is_one_line_before_loading() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _weir("serve", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port))
    assert r.returncode == 2
    assert "the address is in use; pass another --port" in _one_line(r.stderr) and r.stdout == ""


def test_port_file_that_cannot_be_written_is_one_line_before_loading(tmp_path: Path) -> None:
    # WEIR_PORT_FILE, as --port-file: a directory that does not exist is found before the model loads.
    missing = tmp_path / "no-such-dir" / "port"
    r = _weir("serve", "--device", "cpu", "--port", "0", WEIR_PORT_FILE=str(missing))
    assert r.returncode == 2 and r.stdout == ""
    assert _one_line(r.stderr) == (
        f"weir serve: error: --port-file {str(missing)!r}: the directory {str(missing.parent)!r} does not exist"
    )
    # An old file there is removed at start, so it cannot be taken for this server's port (here a
    # model that does not load: the server never serves, and no file says it does).
    old = tmp_path / "port"
    old.write_text("12345\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    r = _weir("serve", str(model), "--device", "cpu", "--port", "0", "--port-file", str(old))
    assert r.returncode == 1 and not old.exists()
    assert "cannot load the model" in _one_line(r.stderr, after_logs=True)


def test_unloadable_model_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    r = _weir("serve", str(tmp_path), "--device", "cpu", "--port", "0")
    assert r.returncode == 1
    assert _one_line(r.stderr, after_logs=True) == (
        f"weir serve: error: cannot load the model: hidden_size in {tmp_path}/config.json must be a positive "
        "integer; got None"
    )


def test_version() -> None:
    r = _weir("--version", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"weir {__version__}"
