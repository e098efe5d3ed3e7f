"""CPU cost of the HTTP serving path, per streamed token and per request, on CPU and without a model.

Starts the real app the way `weir serve` does (structlog JSON logging, `app.server.build_app`,
`app.runner.make_server`: uvicorn on uvloop) in a child process, over a fast fake engine with the
AsyncEngine interface whose step loop emits one token per running request per step. Client processes
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
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONTROL_PREFIX = "/_profile/"


# --------------------------------------------------------------------------------------------- fake engine
class FastFakeEngine:
    """AsyncEngine's interface over a step loop that costs little: each step gives every running request
    one token, with outputs shaped as LLMEngine._make_output builds them (full text and token list plus
    the deltas). Its own CPU time is counted (`engine_cpu_s`) so the harness can leave it out."""

    def __init__(self, tokenizer_dir: str, max_num_seqs: int, step_s: float, max_model_len: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model_path = tokenizer_dir
        self.max_model_len = max_model_len
        self.vocab_size = len(self.tokenizer)
        self.generation_defaults: dict[str, Any] = {}
        self.max_waiting_requests = 1 << 20  # admission never refuses: the harness measures the app
        self.max_waiting_tokens = 1 << 30
        self.max_num_seqs = max_num_seqs
        self.step_s = step_s
        self.warm = False
        self.is_healthy = True
        self.dead_error: BaseException | None = None
        self.engine_cpu_s = 0.0
        self.tokens_emitted = 0
        self._draining = False
        self._waiting: deque[Any] = deque()
        self._running: dict[str, Any] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # A fixed cycle of plain tokens and their texts: detokenizing is the engine's cost, not the app's.
        ids = [i for i in range(1000, 1064)]
        self._pieces = [(i, self.tokenizer.decode([i])) for i in ids]

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())
        self.warm = True

    def begin_drain(self) -> None:
        self._draining = True

    async def shutdown(self, timeout: float = 0.0) -> None:
        self._draining = True
        if self._task is not None:
            self._task.cancel()

    def stats(self) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_waiting_tokens=0,
            kv_cache_usage=0.0,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            num_preemptions=0,
            prompt_tokens_total=0,
            generation_tokens_total=self.tokens_emitted,
            step_loop=None,
        )

    async def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: Any,
        priority: int = 0,
    ) -> AsyncIterator[Any]:
        from engine.outputs.output_channel import OutputChannel
        from engine.outputs.request_output import RequestMetrics

        ids = prompt_token_ids if prompt_token_ids is not None else list(self.tokenizer.encode(prompt or ""))
        queue: OutputChannel[Any] = OutputChannel()  # as AsyncEngine's streams
        req = {
            "id": request_id,
            "prompt": prompt,
            "prompt_ids": ids,
            "max_tokens": params.max_tokens or 16,
            "n": params.n,
            "tokens": [[] for _ in range(params.n)],
            "texts": ["" for _ in range(params.n)],
            "queue": queue,
            "metrics": RequestMetrics(arrival_time=time.monotonic()),
        }
        self._waiting.append(req)
        assert self._wake is not None
        self._wake.set()
        return self._stream(request_id, queue)

    async def _stream(self, request_id: str, queue: Any) -> AsyncIterator[Any]:
        finished = False
        try:
            while True:
                out = await queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self._running.pop(request_id, None)

    async def _loop(self) -> None:
        from engine.outputs.request_output import CompletionOutput, RequestOutput

        assert self._wake is not None
        pieces = self._pieces
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            t0 = time.thread_time()
            while self._waiting and len(self._running) < self.max_num_seqs:
                req = self._waiting.popleft()
                req["metrics"].first_scheduled_time = time.monotonic()
                self._running[req["id"]] = req
            for rid, req in list(self._running.items()):
                outs = []
                done = False
                for i in range(req["n"]):
                    toks = req["tokens"][i]
                    tok, piece = pieces[len(toks) % len(pieces)]
                    toks.append(tok)
                    req["texts"][i] += piece
                    done = len(toks) >= req["max_tokens"]
                    outs.append(
                        CompletionOutput(
                            index=i,
                            text=req["texts"][i],
                            token_ids=list(toks),
                            finish_reason="length" if done else None,
                            text_delta=piece,
                            token_ids_delta=[tok],
                        )
                    )
                    self.tokens_emitted += 1
                if done:
                    del self._running[rid]
                    req["metrics"].finished_time = time.monotonic()
                req["queue"].put(
                    RequestOutput(
                        request_id=rid,
                        prompt=req["prompt"],
                        prompt_token_ids=req["prompt_ids"],
                        outputs=outs,
                        finished=done,
                        num_cached_tokens=0,
                        metrics=req["metrics"],
                    )
                )
            self.engine_cpu_s += time.thread_time() - t0
            await asyncio.sleep(self.step_s)


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
    args = p.parse_args(argv)
    if args.serve:
        serve(args)
        return 0

    from transformers import AutoTokenizer

    args.vocab_for_prompts = min(len(AutoTokenizer.from_pretrained(args.tokenizer)), 10000)
    # The child serves on a socket bound here (port 0: the kernel's pick, as it binds) and passed down:
    # a port only found free here could be taken by another process before the child bound it.
    import socket

    listener = socket.create_server(("127.0.0.1", args.port))
    args.port = listener.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", "--port", str(args.port), "--tokenizer", args.tokenizer]
    cmd += ["--listen-fd", str(listener.fileno())]
    cmd += ["--max-num-seqs", str(args.max_num_seqs), "--step-s", str(args.step_s)]
    cmd += ["--max-model-len", str(args.max_model_len), "--http", args.http]
    log = open(os.devnull, "wb")  # noqa: SIM115 - the child's JSON log lines: part of its cost, not ours
    with listener:  # the child's copy stays open: connections wait in its backlog until it serves
        child = subprocess.Popen(cmd, stderr=log, stdout=log, cwd=REPO, pass_fds=(listener.fileno(),))
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                control(base, "counters")
                break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
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
