"""Live servers for the app tests: real uvicorn (uvloop) on 127.0.0.1, a free port, in a thread.

`server` runs the real AsyncEngine on the tiny llama checkpoint; `fake_server` runs FakeEngine,
whose faults (a failing forward pass, a dead loop, a paused queue) the tests switch on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import ServerConfig
from app.runner import WeirServer, make_server
from app.server import build_app
from app.state import AppState
from tests.app.fake_engine import FakeEngine

MODEL_NAME = "tiny-llama"
API_KEY = "sk-test-key"
START_TIMEOUT_S = 120


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition that has no event to wait on (engine stats), up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@dataclass
class LiveServer:
    server: WeirServer
    thread: threading.Thread
    engine: Any
    state: AppState
    base_url: str

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def stop(self, timeout: float = 60) -> None:
        self.server.request_shutdown()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server did not stop"


def start_server(engine: Any, **overrides: Any) -> LiveServer:
    cfg = ServerConfig(
        host="127.0.0.1", port=0, served_model_name=[MODEL_NAME], shutdown_timeout=5.0, log_level="info"
    )
    cfg = replace(cfg, **overrides)
    app = build_app(engine, cfg)
    server = make_server(app, cfg)
    thread = threading.Thread(target=server.run, name="weir-test-server", daemon=True)
    thread.start()
    if not server.started_event.wait(START_TIMEOUT_S):
        server.should_exit = True
        raise RuntimeError("the test server did not start")
    return LiveServer(server, thread, engine, app.state.weir, f"http://127.0.0.1:{server.port}")


@pytest.fixture(scope="session")
def real_engine_config(tiny_llama_dir: Path) -> Any:
    from engine.config import EngineConfig

    return EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=128)


@pytest.fixture(scope="session")
def server(real_engine_config: Any) -> Iterator[LiveServer]:
    """The real engine on the tiny llama, no API key."""
    from engine.async_engine import AsyncEngine

    live = start_server(AsyncEngine(real_engine_config), sse_keepalive=0.2)
    yield live
    live.stop()


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


@pytest.fixture()
def fake_server(tiny_tokenizer_dir: Path) -> Iterator[LiveServer]:
    """A fresh FakeEngine server per test (faults leave an engine dead)."""
    live = start_server(FakeEngine(tiny_tokenizer_dir, max_model_len=128), sse_keepalive=0.1)
    yield live
    live.stop()
