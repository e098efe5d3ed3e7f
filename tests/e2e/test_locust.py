"""A headless Locust run (loadtest/locustfile.py) against a real `weir serve` on loopback with the tiny
model: a few users stream chat and completion requests for a few seconds; no request may fail, and the
custom TTFT and ITL metrics must have been recorded next to Locust's own entries."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.common import REPO_ROOT
from loadtest.server_process import ServerProcess

# Locust runs in its own process. Never import it here: importing locust monkey-patches the whole
# pytest process with gevent, which deadlocks the asyncio/uvicorn threads of the other tests.

MODEL_NAME = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("locust") / "server.log"
    flags = ["--device", "cpu", "--num-kv-blocks", "256", "--served-model-name", MODEL_NAME]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the server and Locust share two cores
        srv = ServerProcess(str(tiny_llama_dir), flags, log_path=log).start()
    try:
        srv.wait_healthy(timeout=120)
        yield srv
    finally:
        srv.stop()


def test_headless_locust_run(server: ServerProcess, tmp_path: Path) -> None:
    prefix = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(REPO_ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "--host",
        server.url,
        "--users",
        "3",
        "--spawn-rate",
        "3",
        "--run-time",
        "8s",
        "--stop-timeout",
        "20",
        "--csv",
        str(prefix),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--prompt-tokens",
        "12",
        "--max-tokens",
        "6",
        "--chat-fraction",
        "0.5",
    ]
    env = {**os.environ, "WEIR_MODEL_NAME": MODEL_NAME}  # the model name through its environment variable
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, proc.stderr[-3000:]
    for name in ("chat", "completions"):
        assert int(rows[("POST", name)]["Request Count"]) > 0, rows.keys()
        ttft = rows[("TTFT", name)]
        assert int(ttft["Request Count"]) > 0 and float(ttft["Average Response Time"]) > 0
        # One ITL sample per gap between text chunks; a 6-token stream usually has several.
        assert ("ITL", name) in rows
        # The stream's whole duration is Locust's own entry, so it cannot be shorter than its TTFT.
        assert float(rows[("POST", name)]["Average Response Time"]) >= float(ttft["Average Response Time"])
    with open(f"{prefix}_failures.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []
