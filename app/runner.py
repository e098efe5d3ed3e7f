"""uvicorn with weir's shutdown: SIGTERM drains instead of dropping connections.

uvicorn's own handling stops accepting connections at once and, after shutting down, re-raises the
signal (so the process dies of SIGTERM, not with exit code 0). A load balancer wants the opposite
order: keep answering, with 503 for new requests and on /health, while the requests in flight finish
(up to --shutdown-timeout), then abort the rest, close, and exit 0. `WeirServer.handle_exit` does
that; a second SIGINT/SIGTERM stops waiting.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from app.config import ServerConfig
from app.http_protocol import limited_protocol
from app.logging import get_logger
from app.port_file import remove_port_file, write_port_file
from app.state import AppState
from engine.gc_tuning import gen0_threshold
from engine.protocol import EngineClient

log = get_logger("weir.server")

# Once the engine has stopped, open connections only have their last bytes to send.
_CLOSE_CONNECTIONS_TIMEOUT = 5.0


class WeirServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, freeze_gc: bool = False) -> None:
        super().__init__(config)
        self.state = state
        self.freeze_gc = freeze_gc
        self.port: int | None = None
        self.started_event = threading.Event()  # set once serving (tests wait on it)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._shutdown_requested = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)  # runs the lifespan: the engine is loaded and warm
        if self.state.startup_error is not None:
            log.error("cannot start", error=self.state.startup_error)
            self.should_exit = True  # no "serving": the lifespan's shutdown stops the engine
            return
        if self.freeze_gc:
            freeze_startup_objects()
        if self.started:
            self.port = self.servers[0].sockets[0].getsockname()[1]
            self.state.finish_startup()
            if not self._write_port_file():
                return
            log.info("serving", host=self.config.host, port=self.port, pid=_pid())
            self.started_event.set()

    def _write_port_file(self) -> bool:
        """--port-file, once listening (whoever reads it can call /health at once). A file that
        cannot be written stops the server: whoever asked for it would wait for it in vain."""
        path = self.state.config.port_file
        if not path or self.port is None:
            return True
        try:
            write_port_file(path, self.port)
        except OSError as exc:
            self.state.startup_error = f"cannot write --port-file {path!r}: {exc.strerror or exc}"
            log.error("cannot start", error=self.state.startup_error)
            self.should_exit = True
            return False
        return True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread). Never calls super: that would re-raise the signal at exit."""
        name = signal.Signals(sig).name
        if self._shutdown_requested:
            self.force_exit = True
            self.should_exit = True
            self._log_soon("second signal: not waiting any longer", signal=name)
            return
        self._log_soon("shutdown requested", signal=name)
        self.request_shutdown()

    def _log_soon(self, event: str, **kw: Any) -> None:
        # Not from inside the signal handler: it may have interrupted a log call on this thread.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: log.info(event, **kw))

    def request_shutdown(self) -> None:
        """Drain, then stop. Safe from any thread, and more than once."""
        if self._shutdown_requested:
            return
        self._shutdown_requested = True
        loop = self._loop
        if loop is None or not self.started:
            # Still starting up: nothing is in flight; the lifespan shutdown stops the engine.
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.state.drain(self.state.config.shutdown_timeout)
        except Exception:
            log.exception("drain failed")
        finally:
            self.should_exit = True


def freeze_startup_objects() -> None:
    """Move every object alive now out of the cyclic GC's reach (`gc.freeze`).

    What start-up made (torch, transformers, the model, the tokenizer: a great many objects) lives as
    long as the process. Left in the GC's oldest generation, each full collection walks all of it
    while serving, and that stops the event loop (every stream) and the engine's worker thread for
    as long: a few hundred milliseconds with just the tokenizer loaded (loadtest/profile_serving.py).
    Young collections then come every WEIR_GC_GEN0 (50,000) net allocations, not 700.
    Frozen, a full collection only walks what serving allocated since. The collect first frees
    start-up garbage instead of freezing it. `weir serve` starts up with the collector off
    (app/cli.py); it is on from here.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold(), *gc.get_threshold()[1:])  # engine/gc_tuning.py says why
    gc.enable()


def make_server(app: Starlette, cfg: ServerConfig, freeze_gc: bool = False) -> WeirServer:
    """uvicorn (uvloop) over the app. `freeze_gc`: freeze start-up objects once serving (`weir serve`
    does; servers started inside a test process do not, as their objects die with the server)."""
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        loop="uvloop",
        # httptools with bounds on the request head (app/http_protocol.py); never uvicorn's "auto".
        http=limited_protocol(cfg.max_header_bytes, cfg.max_header_count, cfg.header_timeout),
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(_CLOSE_CONNECTIONS_TIMEOUT),
    )
    return WeirServer(config, app.state.weir, freeze_gc=freeze_gc)


def set_switch_interval(seconds: float) -> None:
    """Set the interpreter's thread switch interval, once, for the whole process.

    The event loop (HTTP, SSE, scheduling) and the engine's worker thread (forward pass) share the GIL.
    The worker drops it at every blocking GPU call (a synchronize, a device-to-host copy); getting it
    back while the loop is busy takes up to one switch interval, at each such call. At Python's 5 ms
    that can add milliseconds to every engine step while many streams are being served; at 1 ms the
    wait is five times shorter, at the price of more frequent forced switches (each a few
    microseconds) only while both threads want the GIL. The value is a flag
    (--gil-switch-interval), so a deployment can measure its own.
    """
    sys.setswitchinterval(seconds)


def run_server(engine: EngineClient, cfg: ServerConfig) -> WeirServer:
    """Serve until SIGTERM/SIGINT has drained the engine. Returns the server (for its exit state)."""
    from app.server import build_app

    set_switch_interval(cfg.gil_switch_interval)
    server = make_server(build_app(engine, cfg), cfg, freeze_gc=True)
    try:
        server.run()
    finally:
        remove_port_file(cfg.port_file)  # the file names a port only while this server is on it
    return server


def _pid() -> int:
    import os

    return os.getpid()
