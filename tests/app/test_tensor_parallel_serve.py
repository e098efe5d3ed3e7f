"""`weir serve --tensor-parallel-size 2 --device cpu`: the OpenAI SDK streams the same greedy text as
the in-process tp=1 engine; a worker killed mid-stream ends the stream with an error event, turns
/health and new requests to 503, and SIGTERM still ends the server with no process and no shared
memory left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from engine.executor import shm_broadcast
from tests.app.test_sigterm import ServeProcess, _stream
from tests.process_state import pid_alive


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def tp_serve(tiny_llama_dir: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(tiny_llama_dir, "--tensor-parallel-size", "2", "--num-kv-blocks", "64")
    yield proc
    if proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait(10)


def test_openai_sdk_streams_the_tp1_text(tp_serve: ServeProcess, tiny_llama_dir: Path) -> None:
    prompt = "The quick brown fox"
    with LLM(str(tiny_llama_dir), device="cpu", dtype="float32") as llm:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    sdk = openai.OpenAI(base_url=f"{tp_serve.base_url}/v1", api_key="unused")
    stream = sdk.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [c.choices[0].text for c in stream if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == expected


def test_killed_worker_fails_the_stream_then_sigterm_leaves_no_process(tp_serve: ServeProcess) -> None:
    message = next(e["event"] for e in tp_serve.json_logs() if "worker processes (pids" in e.get("event", ""))
    worker_pids = [int(p) for p in re.search(r"pids ([\d, ]+)", message).group(1).split(", ")]  # type: ignore[union-attr]
    assert len(worker_pids) == 2 and set(worker_pids) <= _descendants(tp_serve.proc.pid)

    started, events, ended = threading.Event(), [], []
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 200, "ignore_eos": True}
    t = threading.Thread(target=_stream, args=(tp_serve.base_url, body, started, events, ended), daemon=True)
    t.start()
    assert started.wait(30), "stream did not start"
    os.kill(worker_pids[1], signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "the stream hung after its worker died"
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "engine_error"
    assert f"rank 1 (pid {worker_pids[1]}) died" in error["message"], error

    with httpx.Client(base_url=tp_serve.base_url, timeout=10) as c:
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert "rank 1" in health.json()["reason"]
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503, r.text

    # The engine's shared-memory ring (named after the server's pid) is unlinked too.
    ring = f"{shm_broadcast.NAME_PREFIX}{tp_serve.proc.pid}-*"
    assert len(list(Path("/dev/shm").glob(ring))) == 1
    everything = _descendants(tp_serve.proc.pid) | set(worker_pids)
    tp_serve.proc.send_signal(signal.SIGTERM)
    assert tp_serve.proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker exits once its pipe closes
    while any(pid_alive(pid) for pid in everything) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in everything if pid_alive(pid)], json.dumps(tp_serve.json_logs()[-5:])
    assert list(Path("/dev/shm").glob(ring)) == []
