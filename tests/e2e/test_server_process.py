"""loadtest/server_process.py's `weir serve` on loopback picks no port itself: the server binds port 0,
the kernel chooses, and the port comes back through --port-file. No port is free only when it was
picked (another process could take it before the server binds it): the benchmarks' and e2e tests'
servers could not start, at random, under concurrent CI jobs."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from loadtest.server_process import ServerProcess
from tests.server_log import serving_port


def test_port_0_reports_and_serves_the_port_it_bound(tiny_llama_dir: Path) -> None:
    flags = ["--device", "cpu", "--num-kv-blocks", "32", "--served-model-name", "tiny"]
    server = ServerProcess(str(tiny_llama_dir), flags)  # the default log path: named after the port
    assert server.port is None and server.cmd[server.cmd.index("--port") + 1] == "0"
    starting_log = server.log_path
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        server.start()
    try:
        assert 0 < server.wait_healthy(timeout=120) < 120
        port = server.port
        assert port is not None and server.url == f"http://127.0.0.1:{port}"
        assert server.port_file is not None and server.port_file.read_text() == f"{port}\n"
        # The log is renamed as before this change (/tmp/weir-serve-{port}.log), and its "serving"
        # line reports that port too.
        assert server.log_path == Path(f"/tmp/weir-serve-{port}.log") and not starting_log.exists()
        assert serving_port(server.log_path.read_text()) == port
        # It is served there, and held: nobody else can bind it.
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        with socket.socket() as s, pytest.raises(OSError):
            s.bind(("127.0.0.1", port))
    finally:
        code = server.stop()
        log_path = server.log_path
    try:
        assert code == 0
        assert server.port_file is not None and not server.port_file.parent.exists()  # nothing left
    finally:
        log_path.unlink(missing_ok=True)


def test_server_that_cannot_start_says_why(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """No port file ever comes: wait_healthy ends as soon as the server exits, with its log's tail."""
    server = ServerProcess(
        str(tiny_llama_dir), ["--device", "cpu", "--max-num-seqs", "-1"], tmp_path / "s.log"
    )
    server.start()
    try:
        with pytest.raises(RuntimeError, match="weir serve exited with 2") as err:
            server.wait_healthy(timeout=120)
        assert "max_num_seqs" in str(err.value) and server.port is None
        with pytest.raises(RuntimeError, match="not known yet"):
            _ = server.url
    finally:
        server.stop()
