"""SIGTERM drain on a real `weir serve` process with the tiny llama: new requests get 503 (or, once
the listener closed, a refused connection), in-flight streams finish or are cut within
--shutdown-timeout, and the process exits 0.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from engine.startup_phases import PHASES
from tests.server_log import log_entries, log_entry

REPO = Path(__file__).resolve().parents[2]
SHUTDOWN_TIMEOUT = 2.5


class ServeProcess:
    def __init__(self, model_dir: Path, *extra: str, port_file: Path | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "app", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0"]
        if port_file is not None:
            cmd += ["--port-file", str(port_file)]
        self.port_file = port_file
        cmd += ["--device", "cpu", "--dtype", "float32", "--served-model-name", "tiny", *extra]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.all_lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = self._wait_for_event("serving", timeout=120)["port"]
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.all_lines.append(line)
            self.lines.put(line)

    def _wait_for_event(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            entry = log_entry(line)
            if entry is not None and entry.get("event") == event:
                return entry
            if self.proc.poll() is not None and self.lines.empty():
                break
        raise AssertionError(f"no {event!r} log line; stderr:\n" + "".join(self.all_lines[-40:]))

    def json_logs(self) -> list[dict]:
        return log_entries("".join(self.all_lines))


def _stream(base_url: str, body: dict, first_chunk: threading.Event, events: list, ended: list) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: ") :]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
                    first_chunk.set()
    ended.append(time.monotonic())


@pytest.fixture()
def serve(tiny_llama_dir: Path, tmp_path: Path):
    proc = ServeProcess(
        tiny_llama_dir, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), port_file=tmp_path / "port"
    )
    yield proc
    if proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait(10)


def test_sigterm_drains_then_exits_0(serve: ServeProcess) -> None:
    # --port 0: the port the "serving" line reports (serve.port, served on below) is in --port-file too.
    assert serve.port_file is not None and serve.port_file.read_text() == f"{serve.port}\n"
    streams = {}
    # n=16 x 240 tokens takes several seconds on CPU: it is cut at the shutdown timeout. The short one
    # has ample time to finish.
    for name, max_tokens, n in (("long", 240, 16), ("short", 5, 1)):
        started, events, ended = threading.Event(), [], []
        body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": max_tokens, "n": n, "ignore_eos": True}
        t = threading.Thread(target=_stream, args=(serve.base_url, body, started, events, ended), daemon=True)
        t.start()
        assert started.wait(30), "stream did not start"
        streams[name] = (t, events, ended)

    serve.proc.send_signal(signal.SIGTERM)
    t_sig = time.monotonic()
    long_in_flight = not streams["long"][2]

    # New work is refused at once: 503 while draining. The listener stays open while a request is in
    # flight (the load balancer sees /health turn 503); only once all are done may it refuse connections.
    with httpx.Client(base_url=serve.base_url, timeout=10) as c:
        try:
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "draining"
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
        except httpx.ConnectError:
            assert not long_in_flight, "the listener closed while a request was still in flight"

    for name, (t, events, ended) in streams.items():
        t.join(SHUTDOWN_TIMEOUT + 15)
        assert not t.is_alive(), f"{name} stream hung"
        assert events[-1] == "[DONE]", events[-3:]
        assert ended[0] - t_sig < SHUTDOWN_TIMEOUT + 5
        last = events[-2]
        if "error" in last:  # cut at the shutdown timeout
            assert last["error"]["code"] == "draining"
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert "error" not in streams["short"][1][-2]  # the short one had time to finish

    assert serve.proc.wait(timeout=30) == 0
    assert not serve.port_file.exists()  # removed at exit: it no longer names a port being served
    logs = serve.json_logs()
    events = [entry["event"] for entry in logs]
    assert "shutdown requested" in events and "draining" in events and "stopped" in events
    # Start-up's phases, in one line just before "serving": every phase, from the process's start.
    startup = logs[events.index("serving") - 1]
    assert startup["event"] == "startup phases"
    assert (
        startup["tokenizer_loader"] == "tokenizers"
    )  # the tiny llama's tokenizer.json, without transformers
    phases = {key: value for key, value in startup.items() if key.endswith("_s") and key != "total_s"}
    assert list(phases) == [f"{name}_s" for name in PHASES] + ["other_s"]
    assert all(value >= 0 for value in phases.values()) and phases["imports_s"] > 0
    assert sum(phases.values()) <= startup["total_s"] + 0.001 * len(phases)  # each rounded to the ms
    finished = [entry for entry in logs if entry["event"] == "request finished"]
    assert len(finished) >= 2 and all(e["request_id"].startswith("cmpl-") for e in finished)
    assert all(
        {"ttft_s", "e2e_s", "prompt_tokens", "completion_tokens", "timestamp"} <= set(e) for e in finished
    )
