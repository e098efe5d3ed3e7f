"""CPU cost of the HTTP serving path, per streamed token and per request, on CPU and without a model.

Starts the real app the way `weir serve` does (structlog JSON logging, `app.server.build_app`,
`app.runner.make_server`: uvicorn on uvloop) in a child process, over a fast fake engine with the
engine client interface (engine/protocol.py; tests/app/fake_engine.py's FakeEngine with a cheaper step
loop) whose step loop emits one token per running request per step. Client processes
drive concurrent streaming /v1/completions requests (token-id prompts, as S1 sends them) with a
minimal raw-socket HTTP/1.1 client, so the client costs little. Around each phase the harness reads
the server process's CPU time and subtracts what the fake engine's own step loop spent:

  setup phase:  N requests with max_tokens=1   -> server CPU per request (connection, HTTP parsing,
                                                  JSON decode, validation, submit, one chunk, log line)
  stream phase: N requests with max_tokens=T   -> (stream - setup) / (N * (T - 1)) per streamed token

    python loadtest/profile_serving.py                           # 400 concurrent, 1024-token prompts, T=128
    python loadtest/profile_serving.py --profile pyinstrument    # also write the server's profile (text)
    python loadtest/profile_serving.py --profile cprofile        # ... or cProfile's, sorted by tottime

The numbers are for comparing changes on one machine; the fake engine stands in for the step loop only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONTROL_PREFIX = "/_profile/"


# --------------------------------------------------------------------------------------------- fake engine
from engine.outputs.output_channel import OutputChannel  # noqa: E402
from tests.app.fake_engine import FakeEngine  # noqa: E402


class _Channel(OutputChannel[Any]):
    """AsyncEngine's per-request stream channel, under the name FakeEngine puts with."""

    __slots__ = ()
    put_nowait = OutputChannel.put


class FastFakeEngine(FakeEngine):
    """The app tests' FakeEngine (tests/app/fake_engine.py: the EngineClient protocol, the engine's own
    input processor and output shapes) with a step loop that costs little: each step gives every
    running request one token from a fixed cycle (no sampling, no detokenizing: those are the engine's
    cost, not the app's), with outputs carrying full text and token list plus the deltas, as the
    engine's output processor builds them. Admission never refuses (the harness measures the app).
    The step loop's own CPU time is counted (`engine_cpu_s`) so the harness can leave it out."""

    new_output_queue = _Channel  # as AsyncEngine's streams

    def __init__(self, tokenizer_dir: str, max_num_seqs: int, step_s: float, max_model_len: int) -> None:
        super().__init__(
            tokenizer_dir,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            step_delay=step_s,
            max_waiting_requests=1 << 20,
            max_waiting_tokens=1 << 40,
            kv_capacity_tokens=max_model_len * max(max_num_seqs, 1),
        )
        # The whole vocabulary is valid input (the harness's prompts draw from it).
        self.vocab_size = self.input_processor.vocab_size = len(self.tokenizer)
        self.engine_cpu_s = 0.0
        first = min(1000, max(self.vocab_size - 64, 0))  # plain tokens of any but a tiny vocabulary
        ids = list(range(first, min(first + 64, self.vocab_size)))
        self._pieces = [(i, self.tokenizer.decode([i])) for i in ids]

    @property
    def tokens_emitted(self) -> int:
        return self._counters["generation"]

    async def _run(self) -> None:
        assert self._wake is not None and self._idle is not None
        while True:
            if not self._waiting and not self._running:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            t0 = time.thread_time()
            while self._waiting and len(self._running) < self.max_num_seqs:
                req = self._waiting.popleft()
                req.metrics.first_scheduled_time = time.monotonic()
                self._counters["prompt"] += len(req.prompt_token_ids)
                self._running.append(req)
            for req in list(self._running):
                self._step(req)
            self.engine_cpu_s += time.thread_time() - t0
            await asyncio.sleep(self.step_delay)

    def _step(self, req: Any) -> None:
        pieces = self._pieces
        prompt_len = len(req.prompt_token_ids)
        limit = min(req.params.max_tokens or self.max_model_len, self.max_model_len - prompt_len)
        for s in req.seqs:
            if s.finish_reason is not None:
                continue
            tok, piece = pieces[len(s.token_ids) % len(pieces)]
            s.token_ids.append(tok)
            s.text += piece
            self._counters["generation"] += 1
            if len(s.token_ids) >= limit:
                s.finish_reason = "length"
        self._publish(req)


# --------------------------------------------------------------------------------------------- server child
_gc_time = [0.0, 0.0]  # total seconds in the cyclic GC, start of the current collection
_gc_by_generation = [[0, 0.0], [0, 0.0], [0, 0.0]]  # collections, seconds


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_time[1] = time.thread_time()
    else:
        dt = time.thread_time() - _gc_time[1]
        _gc_time[0] += dt
        g = _gc_by_generation[info["generation"]]
        g[0] += 1
        g[1] += dt


class ControlApp:
    """The weir app plus /_profile/* routes for the harness: CPU counters, profiler start/stop."""

    def __init__(self, app: Any, engine: FastFakeEngine) -> None:
        self.app = app
        self.engine = engine
        self.profiler: Any = None
        self.profile_kind = "none"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(CONTROL_PREFIX):
            await self.app(scope, receive, send)
            return
        action = scope["path"][len(CONTROL_PREFIX) :]
        query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode().split("&") if "=" in p)
        if action == "start":
            self._start(query.get("kind", "none"))
        elif action == "stop":
            self._stop(query.get("path", ""))
        body = json.dumps(
            {
                "process_cpu_s": time.process_time(),
                "sys_cpu_s": os.times().system,
                "engine_cpu_s": self.engine.engine_cpu_s,
                "vocab_size": self.engine.vocab_size,
                "tokens": self.engine.tokens_emitted,
                "gc_s": _gc_time[0],
                "gc_by_generation": _gc_by_generation,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _start(self, kind: str) -> None:
        self.profile_kind = kind
        if kind == "pyinstrument":
            from pyinstrument import Profiler

            # async_mode disabled: sample whatever the loop thread runs, not one task's awaits.
            self.profiler = Profiler(interval=0.0005, async_mode="disabled")
            self.profiler.start()
        elif kind == "cprofile":
            import cProfile

            self.profiler = cProfile.Profile()
            self.profiler.enable()

    def _stop(self, path: str) -> None:
        if self.profiler is None:
            return
        if self.profile_kind == "pyinstrument":
            self.profiler.stop()
            Path(path).write_text(self.profiler.output_text(unicode=False, color=False, show_all=False))
        elif self.profile_kind == "cprofile":
            import io
            import pstats

            self.profiler.disable()
            buf = io.StringIO()
            pstats.Stats(self.profiler, stream=buf).sort_stats("tottime").print_stats(60)
            buf.write("\n\n")
            pstats.Stats(self.profiler, stream=buf).sort_stats("cumulative").print_stats(60)
            Path(path).write_text(buf.getvalue())
        self.profiler = None


def serve(args: argparse.Namespace) -> None:
    from app.config import ServerConfig
    from app.logging import configure_logging
    from app.runner import make_server
    from app.server import build_app

    cfg = ServerConfig(host="127.0.0.1", port=args.port, served_model_name=["fake"], shutdown_timeout=1.0)
    configure_logging(cfg.log_level, cfg.log_json)
    engine = FastFakeEngine(args.tokenizer, args.max_num_seqs, args.step_s, args.max_model_len)
    app = build_app(engine, cfg)
    # As `weir serve` (app.runner.run_server) does; the baseline tree's make_server may not take it.
    try:
        server = make_server(app, cfg, freeze_gc=True)
    except TypeError:
        server = make_server(app, cfg)
    server.config.app = ControlApp(app, engine)
    if args.http != "default":
        server.config.http = args.http  # read when the server starts
    import gc
    import socket

    gc.callbacks.append(_gc_callback)
    server.run(sockets=None if args.listen_fd is None else [socket.socket(fileno=args.listen_fd)])


# --------------------------------------------------------------------------------------------- client
async def _one(host: str, port: int, body: bytes) -> tuple[int, bool]:
    """One streamed request over its own connection: (data events seen, ended with [DONE])."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        if b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError("expected a chunked response")
        events, done, tail = 0, False, b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            events += data.count(b"data: {")
            tail = data
        done = tail.rstrip().endswith(b"data: [DONE]")
        return events, done
    finally:
        writer.close()


async def _drive(host: str, port: int, bodies: list[bytes]) -> tuple[int, int]:
    results = await asyncio.gather(*(_one(host, port, b) for b in bodies))
    return sum(e for e, _ in results), sum(1 for _, d in results if not d)


def _client_proc(host: str, port: int, bodies: list[bytes], conn: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    conn.send(asyncio.run(_drive(host, port, bodies)))
    conn.close()


def run_clients(host: str, port: int, bodies: list[bytes], num_clients: int) -> tuple[int, int, float]:
    """Send every body at once from `num_clients` processes; (events, streams without [DONE], wall s)."""
    ctx = mp.get_context("fork")
    procs, pipes = [], []
    t0 = time.perf_counter()
    for k in range(num_clients):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client_proc, args=(host, port, bodies[k::num_clients], child))
        p.start()
        procs.append(p)
        pipes.append(parent)
    events = bad = 0
    for p, pipe in zip(procs, pipes, strict=True):
        e, b = pipe.recv()
        events += e
        bad += b
        p.join()
    return events, bad, time.perf_counter() - t0


def control(base: str, action: str, **query: str) -> dict[str, Any]:
    import urllib.request

    qs = "&".join(f"{k}={v}" for k, v in query.items())
    with urllib.request.urlopen(f"{base}{CONTROL_PREFIX}{action}?{qs}", timeout=30) as r:
        return json.loads(r.read())


def make_bodies(n: int, prompt_len: int, max_tokens: int, vocab: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [
        json.dumps(
            {
                "model": "fake",
                "prompt": [rng.randrange(vocab) for _ in range(prompt_len)],
                "max_tokens": max_tokens,
                "temperature": 1.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        for _ in range(n)
    ]


def measure(
    base: str, args: argparse.Namespace, max_tokens: int, seed: int, profile: str = ""
) -> dict[str, Any]:
    bodies = make_bodies(args.concurrency, args.prompt_len, max_tokens, args.vocab_for_prompts, seed)
    before = control(base, "start", kind=profile or "none")
    events, bad, wall = run_clients("127.0.0.1", args.port, bodies, args.clients)
    after = control(base, "stop", path=args.profile_out if profile else "")
    cpu = after["process_cpu_s"] - before["process_cpu_s"]
    engine = after["engine_cpu_s"] - before["engine_cpu_s"]
    if bad:
        raise RuntimeError(f"{bad} streams ended without [DONE]")
    return {
        "requests": len(bodies),
        "max_tokens": max_tokens,
        "tokens": after["tokens"] - before["tokens"],
        "events": events,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "engine_cpu_s": engine,
        "app_cpu_s": cpu - engine,
        "gc_s": after["gc_s"] - before["gc_s"],
        "gc_collections": [
            [a[0] - b[0], round(a[1] - b[1], 4)]
            for a, b in zip(after["gc_by_generation"], before["gc_by_generation"], strict=True)
        ],
        "sys_cpu_s": after["sys_cpu_s"] - before["sys_cpu_s"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=400, help="requests sent at once per phase")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256, help="the fake engine's batch size")
    p.add_argument("--step-s", type=float, default=0.0, help="the fake engine's sleep between steps")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--clients", type=int, default=1, help="client processes")
    p.add_argument("--repeats", type=int, default=3, help="measured rounds per phase (median reported)")
    p.add_argument("--profile", choices=("none", "pyinstrument", "cprofile"), default="none")
    p.add_argument("--profile-out", default="/tmp/weir-serving-profile.txt")
    p.add_argument(
        "--profile-max-tokens", type=int, default=None, help="max_tokens of the profiled phase (default: T)"
    )
    p.add_argument("--tokenizer", default=str(REPO / "engine" / "default_model"))
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--http", choices=("default", "h11", "httptools"), default="default", help="uvicorn's HTTP protocol"
    )
    p.add_argument("--json", default=None, help="write the figures here too")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server child
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)  # the child's socket
    p.add_argument("--error-file", default=None, help=argparse.SUPPRESS)  # the child's traceback, if it fails
    args = p.parse_args(argv)
    if args.profile == "pyinstrument" and not args.serve:
        import importlib.util

        if importlib.util.find_spec("pyinstrument") is None:
            p.error(
                "--profile pyinstrument needs pyinstrument (pip install pyinstrument); or --profile cprofile"
            )
    if args.serve:
        try:
            serve(args)
        except BaseException:
            if args.error_file:
                import traceback

                Path(args.error_file).write_text(traceback.format_exc())
            raise
        return 0

    # The child serves on a socket bound here (port 0: the kernel's pick, as it binds) and passed down:
    # a port only found free here could be taken by another process before the child bound it.
    import socket

    listener = socket.create_server(("127.0.0.1", args.port))
    args.port = listener.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", "--port", str(args.port), "--tokenizer", args.tokenizer]
    cmd += ["--listen-fd", str(listener.fileno())]
    cmd += ["--max-num-seqs", str(args.max_num_seqs), "--step-s", str(args.step_s)]
    cmd += ["--max-model-len", str(args.max_model_len), "--http", args.http]
    error_file = Path(tempfile.mkdtemp(prefix="weir-profile-serving-")) / "server-error.txt"
    cmd += ["--error-file", str(error_file)]
    log = open(os.devnull, "wb")  # noqa: SIM115 - the child's JSON log lines: part of its cost, not ours
    with listener:  # the child's copy stays open: connections wait in its backlog until it serves
        child = subprocess.Popen(cmd, stderr=log, stdout=log, cwd=REPO, pass_fds=(listener.fileno(),))
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                # Prompts draw from the server's vocabulary (the client loads no tokenizer).
                args.vocab_for_prompts = min(control(base, "counters")["vocab_size"], 10000)
                break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    why = error_file.read_text() if error_file.exists() else f"exit status {child.poll()}"
                    raise RuntimeError(f"the server did not start:\n{why}") from None
                time.sleep(0.2)
        measure(base, args, args.max_tokens, seed=99)  # warm-up: imports, first-use caches
        setup, stream = [], []
        for r in range(args.repeats):
            setup.append(measure(base, args, 1, seed=2 * r))
            stream.append(measure(base, args, args.max_tokens, seed=2 * r + 1))
        if args.profile != "none":
            measure(base, args, args.profile_max_tokens or args.max_tokens, seed=1000, profile=args.profile)
    finally:
        child.terminate()
        child.wait(30)
        shutil.rmtree(error_file.parent, ignore_errors=True)

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    n, t = args.concurrency, args.max_tokens
    per_request = [s["app_cpu_s"] / n * 1e6 for s in setup]
    per_token = [
        (st["app_cpu_s"] - se["app_cpu_s"]) / (n * (t - 1)) * 1e6
        for se, st in zip(setup, stream, strict=True)
    ]
    per_token_all_in = [st["app_cpu_s"] / (n * t) * 1e6 for st in stream]
    result = {
        "concurrency": n,
        "prompt_len": args.prompt_len,
        "max_tokens": t,
        "per_request_us": round(median(per_request), 1),
        "per_token_us": round(median(per_token), 2),
        "per_token_all_in_us": round(median(per_token_all_in), 2),
        "engine_cpu_per_token_us": round(median([s["engine_cpu_s"] / (n * t) * 1e6 for s in stream]), 2),
        "sys_per_token_us": round(median([s["sys_cpu_s"] / (n * t) * 1e6 for s in stream]), 2),
        "sys_per_request_us": round(median([s["sys_cpu_s"] / n * 1e6 for s in setup]), 1),
        "gc_per_token_us": round(median([s["gc_s"] / (n * t) * 1e6 for s in stream]), 2),
        "stream_wall_s": round(median([s["wall_s"] for s in stream]), 3),
        "stream_tok_s": round(n * t / median([s["wall_s"] for s in stream]), 1),
        "samples": {
            "per_request_us": [round(x, 1) for x in per_request],
            "per_token_us": [round(x, 2) for x in per_token],
        },
        "phases": {"setup": setup, "stream": stream},
    }
    print(json.dumps(result, indent=2))
    if args.profile != "none":
        print(f"profile of one stream phase: {args.profile_out}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
