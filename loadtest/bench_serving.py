"""S1: serving through HTTP + SSE. T2's requests (Llama-3-8B shape, 1024 prompt / 128 output tokens) sent
to a running `weir serve` by a streaming async httpx client: all at once (rate inf) and as a Poisson
process at 16 req/s. Reports output tok/s, TTFT p50/p99, inter-token latency p50/p99, and the
serving/offline ratio (S1 at rate inf / T2 output tok/s).

    python loadtest/bench_serving.py --shape llama3-8b --offline-json t2.json --out s1.json

Starts `weir serve` itself (dummy weights for a --shape) unless --url (--base-url, or --host/--port) names a
running server; with no --model or --shape then, it is a client only (`weir bench serve`: any
OpenAI-compatible server, --endpoint and --model-name as vLLM's). The offline
figure comes from T2's JSON (--offline-json), else is measured here first, in this process, on the same
requests. Every SSE chunk carrying a choice is a token event, as in `vllm bench serve`; a stream without
`data: [DONE]` or with an error event fails its request.

The client (`--client fast`, the default) reads each stream with a small asyncio protocol: HTTP/1.1
chunked decoding and SSE framing by hand, the JSON of each event decoded by msgspec into the two fields
it needs. Rate inf is ~128k events in one process, and httpx's line iterator plus json.loads cost
~80 us of client CPU per event (measured on a 2-core VM, loadtest/profile_serving.py's server), enough
to make the client, not the server, set the pace and to delay the timestamps of a step's burst of
events; the fast client costs a few us per event. `--client httpx` keeps the old path (common's
stream_completion) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.bench_throughput import (  # noqa: E402
    add_random_dataset_args,
    make_workload,
    run_offline,
    warmup_workload,
)
from loadtest.common import (  # noqa: E402
    Report,
    Workload,
    add_common_args,
    build_llm,
    copy_bandwidth_phase,
    default_max_model_len,
    engine_kwargs,
    free_engine,
    install_signal_handlers,
    percentile,
    phase,
    resolve_model,
    step_loop_delta,
    summarize_ms,
)
from loadtest.hf_peer import run_peer  # noqa: E402
from loadtest.server_process import (  # noqa: E402
    ServerProcess,
    first_model_id,
    raise_fd_limit,
    server_flags,
)
from loadtest.streaming import (  # noqa: E402
    StreamResult,
    stream_completion,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--url",
        "--base-url",
        dest="url",
        default=None,
        help="a running OpenAI-compatible server, weir's or another engine's (default: start `weir serve` here)",
    )
    p.add_argument("--host", default=None, help="with --port: the server at http://HOST:PORT (as --url)")
    p.add_argument("--port", type=int, default=None, help="with --host (default 127.0.0.1): as --url")
    p.add_argument("--endpoint", default="/v1/completions", help="path of the streaming completions route")
    p.add_argument(
        "--model-name",
        default=None,
        help="the model named in requests (default: the server's first /v1/models entry)",
    )
    p.add_argument(
        "--request-rates",
        "--request-rate",
        dest="request_rates",
        default="inf,16",
        help="comma-separated req/s; inf sends all at once",
    )
    p.add_argument(
        "--num-requests",
        "--num-prompts",
        dest="num_requests",
        type=int,
        default=None,
        help="default: T2's 1000",
    )
    p.add_argument(
        "--num-requests-finite-rate",
        type=int,
        default=None,
        help="requests sent at each finite rate (fresh prompts of the same shape; default: as many as T2)",
    )
    add_random_dataset_args(p)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument(
        "--client", choices=("fast", "httpx"), default="fast", help="streaming client (see the docstring)"
    )
    p.add_argument("--warmup-requests", "--num-warmups", dest="warmup_requests", type=int, default=8)
    p.add_argument("--offline-json", default=None, help="T2's report; its output tok/s is the offline figure")
    p.add_argument(
        "--offline", choices=("auto", "none"), default="auto", help="none: skip the offline figure"
    )
    p.add_argument(
        "--served-model-name", default="weir-bench", help="the name the server started here serves"
    )
    p.add_argument("--save-result", action="store_true", help="as vLLM's: write the JSON under --result-dir")
    p.add_argument("--result-dir", default=".", help="with --save-result")
    p.add_argument("--result-filename", default=None, help="with --save-result (default: from rate and time)")
    p.add_argument("--server-log", default=None)
    p.add_argument("--server-timeout", type=float, default=600.0)
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra `weir serve` argument (repeatable)"
    )
    add_common_args(p, default_shape="llama3-8b")
    return p


def run_async(coro: Any) -> Any:
    """asyncio.run on uvloop where it is installed (a weir dependency): the client's loop costs less."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def rate_label(rate: float) -> str:
    if rate == float("inf"):
        return "rate_inf"
    return f"rate_{int(rate)}" if rate == int(rate) else f"rate_{rate:g}"


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0


class _Chunk(msgspec.Struct):
    """The fields of a streamed chunk the benchmark reads; the rest is skipped by the decoder."""

    choices: list[msgspec.Raw] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class _StreamProtocol(asyncio.Protocol):
    """One streamed POST on its own connection, parsed as bytes arrive: the status line and headers, the
    chunked body, then SSE events (`\n\n`-separated, as weir frames them). Every event of one read gets
    that read's timestamp: when the bytes reached this process."""

    def __init__(self, request: bytes, res: StreamResult, finished: asyncio.Future[None]) -> None:
        self.request = request
        self.res = res
        self.finished = finished
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # received, not parsed yet
        self.body = bytearray()  # de-chunked, not yet split into events
        self.status: int | None = None
        self.chunked = False
        self.length: int | None = None  # content-length of a non-chunked body
        self.need = 0  # >0: data bytes left in the current chunk; -1: its CRLF; 0: a size line next
        self.last = res.start
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._finish(f"{type(exc).__name__}: {exc}")
        elif self.status is not None and self.status != 200 and self.chunked is False:
            self._finish(self._http_error())  # a body delimited by the connection closing
        else:
            self._finish("stream ended without data: [DONE]")

    def data_received(self, data: bytes) -> None:
        if self.finished.done():
            return
        now = time.perf_counter()
        self.buf += data
        try:
            if self.status is None and not self._head():
                return
            ended = self._dechunk() if self.chunked else self._plain()
            if self.status != 200:
                if ended:
                    self._finish(self._http_error())
                return
            self._events(now)
            if ended and not self.finished.done():
                self._finish("stream ended without data: [DONE]")
        except Exception as exc:  # noqa: BLE001 - a malformed response fails this request, not the run
            self._finish(f"{type(exc).__name__}: {exc}")

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[: end + 4]
        self.status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self.chunked = True
            elif name == b"content-length":
                self.length = int(value)
        return True

    def _plain(self) -> bool:
        self.body += self.buf
        self.buf.clear()
        return self.length is not None and len(self.body) >= self.length

    def _dechunk(self) -> bool:
        """Moves chunk data from buf to body; True once the last (empty) chunk came."""
        buf, pos, n = self.buf, 0, len(self.buf)
        ended = False
        while pos < n:
            if self.need > 0:  # inside a chunk's data
                take = min(self.need, n - pos)
                self.body += buf[pos : pos + take]
                pos += take
                self.need -= take
                if self.need == 0:
                    self.need = -1
            elif self.need < 0:  # the CRLF after a chunk's data
                if n - pos < 2:
                    break
                pos += 2
                self.need = 0
            else:  # a size line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    ended = True
                    break
                self.need = size
        del buf[:pos]
        return ended

    def _events(self, now: float) -> None:
        body = self.body
        while not self.finished.done():
            end = body.find(b"\n\n")
            if end < 0:
                return
            block = bytes(body[:end])
            del body[: end + 2]
            self._event(block, now)

    def _event(self, block: bytes, now: float) -> None:
        res = self.res
        event = None
        if block.startswith(b"data: ") and b"\n" not in block:  # weir's one-line events
            data = block[6:].strip()
        else:
            lines = []
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    lines.append(line[5:].strip())
                elif line.startswith(b"event:"):
                    event = line[6:].strip()
            if not lines:
                return  # a comment (keep-alive ping) or an empty block
            data = b"\n".join(lines)
        if data == b"[DONE]":
            res.latency = now - res.start
            res.ok = True
            self._finish(None)
            return
        chunk = _decode_chunk(data)
        if event == b"error" or chunk.error:
            self._finish(f"error event: {data[:300].decode(errors='replace')}")
            return
        if chunk.usage:
            res.output_tokens = int(chunk.usage.completion_tokens or 0)
            res.prompt_tokens = int(chunk.usage.prompt_tokens or 0)
        if chunk.choices:
            if res.ttft is None:
                res.ttft = now - res.start
            else:
                res.itl.append(now - self.last)
            self.last = now
            res.chunks += 1

    def _http_error(self) -> str:
        return f"HTTP {self.status}: {bytes(self.body).decode(errors='replace')[:300]}"

    def _finish(self, error: str | None) -> None:
        if self.finished.done():
            return
        if error is not None:
            self.res.ok = False
            self.res.error = error
        self.finished.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def fast_stream_completion(
    host: str, port: int, payload: dict[str, Any], path: str = "/v1/completions"
) -> StreamResult:
    """`loadtest.streaming.stream_completion`'s result, from `_StreamProtocol` instead of httpx."""
    body = msgspec.json.encode(payload)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    res = StreamResult(ok=False, start=time.perf_counter())
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: _StreamProtocol(request, res, finished), host, port), 60.0
        )
        await finished
    except Exception as exc:  # noqa: BLE001 - a transport error fails this request, not the run
        res.ok = False
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_rate(
    url: str,
    model_name: str,
    workload: Workload,
    rate: float,
    temperature: float,
    seed: int,
    max_concurrency: int | None = None,
    client_kind: str = "fast",
    endpoint: str = "/v1/completions",
) -> list[StreamResult]:
    """Send every request of the workload at `rate` (Poisson arrivals; inf: all at once) to url + endpoint."""
    import httpx

    n = len(workload)
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path.rstrip("/") + endpoint  # a base URL may carry a prefix (http://gateway/llm)

    async def one(client: httpx.AsyncClient | None, prompt: list[int], max_tokens: int) -> StreamResult:
        payload = {
            "model": model_name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if sem is not None:
            await sem.acquire()
        try:
            if client is None:
                res = await fast_stream_completion(host, port, payload, path)
            else:
                res = await stream_completion(client, payload, endpoint)
        finally:
            if sem is not None:
                sem.release()
        if res.ok and not res.output_tokens:
            res.output_tokens = max_tokens  # ignore_eos: every request runs to max_tokens
        res.prompt_tokens = res.prompt_tokens or len(prompt)
        return res

    async def send_all(client: httpx.AsyncClient | None) -> list[StreamResult]:
        tasks = []
        for prompt, out_len in zip(workload.prompts, workload.output_lens, strict=True):
            tasks.append(asyncio.create_task(one(client, prompt, out_len)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))

    if client_kind == "fast":
        if parts.scheme != "http":
            raise ValueError(f"--client fast speaks plain http; got {url} (use --client httpx)")
        return await send_all(None)
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    timeout = httpx.Timeout(None, connect=60.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        return await send_all(client)


def scrape_step_loop(url: str) -> dict[str, float] | None:
    """The server's `weir:step_loop_seconds_total` by phase and `weir:engine_steps_total` (None when the
    server has no such series, e.g. another engine behind --url)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=10.0).text
    except httpx.HTTPError:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "weir:step_loop_seconds_total":
                out[sample.labels["phase"]] = out.get(sample.labels["phase"], 0.0) + sample.value
            elif sample.name == "weir:engine_steps_total":
                out["steps"] = out.get("steps", 0.0) + sample.value
    return out or None


def summarize(results: list[StreamResult], duration: float, rate: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [
        (r.latency - r.ttft) / (r.output_tokens - 1)
        for r in ok
        if r.latency is not None and r.ttft is not None and r.output_tokens > 1
    ]
    errors = sorted({r.error for r in results if r.error})
    return {
        "request_rate": "inf" if rate == float("inf") else rate,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors_sample": errors[:5],
        "duration_s": round(duration, 4),
        "req_s": round(len(ok) / duration, 4),
        "output_tokens": out_tokens,
        "output_tok_s": round(out_tokens / duration, 2),
        "total_tok_s": round((out_tokens + prompt_tokens) / duration, 2),
        **summarize_ms([r.ttft for r in ok if r.ttft is not None], "ttft"),
        **summarize_ms([g for r in ok for g in r.itl], "itl"),
        **summarize_ms(tpot, "tpot"),
        **summarize_ms([r.latency for r in ok if r.latency is not None], "e2e"),
        "token_events": sum(r.chunks for r in ok),
        # The whole distributions, for the suite's figure (loadtest/plot_suite.py): percentiles 0..100.
        "ttft_quantiles_ms": quantiles_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_quantiles_ms": quantiles_ms([g for r in ok for g in r.itl]),
    }


def quantiles_ms(values_s: list[float], steps: int = 100) -> list[float] | None:
    """The 0th, 1st, ... 100th percentiles in ms (101 numbers stand for any number of samples)."""
    if not values_s:
        return None
    return [round(percentile(values_s, 100.0 * i / steps) * 1000.0, 4) for i in range(steps + 1)]


def offline_figure(
    report: Report, args: argparse.Namespace, model: Any, workload: Workload, mml: Any
) -> None:
    """T2's output tok/s: from --offline-json, else measured here (before the server takes the device)."""
    if args.offline_json:
        with phase(report, "offline_json", required=False):
            t2 = json.loads(Path(args.offline_json).read_text())
            res = t2.get("results") or {}
            if not res.get("output_tok_s"):
                raise ValueError(
                    f"{args.offline_json} has no results.output_tok_s (status {t2.get('status')})"
                )
            report["offline"] = {
                "source": args.offline_json,
                "output_tok_s": res["output_tok_s"],
                "req_s": res.get("req_s"),
                "card": t2.get("card"),
                "commit": t2.get("commit"),
            }
            wl = t2.get("workload") or {}
            if wl.get("num_requests") != len(workload) or wl.get("input_len") != workload.description.get(
                "input_len"
            ):
                report.note(f"offline JSON's workload differs from this run's: {wl}")
            if t2.get("peer") and args.peer == "hf":
                report["peer"] = {**t2["peer"], "source": args.offline_json}
        return
    if args.offline == "none":
        return
    llm = None
    try:
        with phase(report, "offline"):
            llm, _ = build_llm(model, engine_kwargs(args, model, max_model_len=mml))
            run_offline(llm, warmup_workload(workload, 8, args.seed, model.vocab_size), 1.0)
            res = run_offline(llm, workload, args.temperature)
            report["offline"] = {"source": "measured in this run", **res}
    except Exception:  # noqa: BLE001 - recorded by phase()
        pass
    finally:
        if llm is not None:
            free_engine(llm)


def target_url(args: argparse.Namespace) -> str | None:
    """--url, else http://--host:--port when either is given, else None (start a server here)."""
    if args.url:
        return args.url
    if args.host or args.port:
        return f"http://{args.host or '127.0.0.1'}:{args.port or 8000}"
    return None


def result_path(args: argparse.Namespace, rates: list[float]) -> str | None:
    """--out, else with --save-result: --result-dir / (--result-filename or one named after rate and time)."""
    if args.out or not args.save_result:
        return args.out
    name = args.result_filename
    if not name:
        rate = "-".join("inf" if r == float("inf") else f"{r:g}" for r in rates)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"weir-bench-serve-{rate}qps-{args.model_name or 'model'}-{stamp}.json".replace("/", "_")
    return str(Path(args.result_dir) / name)


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    args.workload = "t2"
    url = target_url(args)
    # Against a running server with no local model named (`weir bench serve`), this is a client only: the
    # prompts' ids stay below --token-id-max, and no offline figure, peer or copy bandwidth is measured here.
    client_only = url is not None and not args.model and not args.shape
    model = None if client_only else resolve_model(args)
    vocab = args.token_id_max if model is None else model.vocab_size
    workload = make_workload(args, vocab)
    rates = [float(r) for r in args.request_rates.split(",") if r.strip()]
    args.out = result_path(args, rates)
    report = Report("S1", args, model)
    report["workload"] = {**workload.description, "request_rates": [str(r) for r in rates]}
    raise_fd_limit()
    mml = None
    if model is not None:
        mml = default_max_model_len(args, model, workload.max_seq_len)
        offline_figure(report, args, model, workload, mml)
        if report["peer"] is None:
            run_peer(report, model, args, workload, default_batch=min(len(workload), 256))
    else:
        report["target"] = {"url": url, "endpoint": args.endpoint}

    server = None
    try:
        if url is None:
            assert model is not None
            flags = server_flags(args, model, mml) + ["--served-model-name", args.served_model_name]
            # Rate inf queues the whole workload at once: keep admission control (429) out of the way.
            flags += ["--max-waiting-requests", str(max(1024, 2 * len(workload)))]
            flags += ["--max-waiting-tokens", str(max(1 << 20, 2 * workload.num_prompt_tokens))]
            flags += list(args.server_arg)
            server = ServerProcess(model.model_dir, flags, log_path=args.server_log)
            with phase(report, "server_start"):
                server.start()
                report["results"]["server_ready_s"] = round(server.wait_healthy(args.server_timeout), 3)
            url = server.url
        model_name = args.model_name or (
            args.served_model_name if server else (first_model_id(url) or args.served_model_name)
        )
        report["workload"]["model_name"] = model_name
        with phase(report, "warmup"):
            if args.warmup_requests > 0:
                warm = warmup_workload(workload, args.warmup_requests, args.seed, vocab)
                res = run_async(
                    run_rate(
                        url, model_name, warm, float("inf"), 1.0, args.seed, None, args.client, args.endpoint
                    )
                )
                bad = [r.error for r in res if not r.ok]
                if bad:
                    raise RuntimeError(f"{len(bad)} warm-up requests failed: {bad[0]}")
        for k, rate in enumerate(rates):
            # Each rate gets its own random prompts of T2's shape (seed + k): the previous rate's prompts
            # may still sit in the prefix cache, and hits would flatter TTFT.
            wl = workload
            if k > 0:
                wl = make_workload(argparse.Namespace(**{**vars(args), "seed": args.seed + k}), vocab)
            if rate != float("inf"):
                wl = wl.head(args.num_requests_finite_rate)
            label = rate_label(rate)
            try:  # a failed rate is recorded; the next one still runs
                with phase(report, label):
                    loop_before = scrape_step_loop(url)
                    t0 = time.perf_counter()
                    results = run_async(
                        run_rate(
                            url,
                            model_name,
                            wl,
                            rate,
                            args.temperature,
                            args.seed,
                            args.max_concurrency,
                            args.client,
                            args.endpoint,
                        )
                    )
                    summary = summarize(results, time.perf_counter() - t0, rate)
                    summary["step_loop_s"] = step_loop_delta(loop_before, scrape_step_loop(url))
                    report["results"][label] = summary
                    print(
                        f"[S1] {label}: {summary['completed']}/{summary['num_requests']} ok, "
                        f"{summary['output_tok_s']:.1f} output tok/s, TTFT p50 {summary['ttft_p50_ms']} ms, "
                        f"ITL p50 {summary['itl_p50_ms']} ms",
                        flush=True,
                    )
                    if summary["failed"]:
                        raise RuntimeError(f"{summary['failed']} requests failed: {summary['errors_sample']}")
            except RuntimeError:
                pass
            if len(wl) < len(workload):
                report.note(f"{label}: {len(wl)} requests of T2's shape (seed {args.seed + k})")
    except Exception:  # noqa: BLE001 - recorded by phase()
        if server is not None:
            print(server.log_tail(), file=sys.stderr)
    finally:
        if server is not None:
            report["results"]["server_exit_code"] = server.stop()
    if model is not None:
        copy_bandwidth_phase(report, model.device, args.copy_bytes)

    offline = (report.data.get("offline") or {}).get("output_tok_s")
    inf = (report["results"].get("rate_inf") or {}).get("output_tok_s")
    if offline and inf:
        report["results"]["offline_output_tok_s"] = offline
        report["results"]["serving_offline_ratio"] = round(inf / offline, 4)
        report["ratios"]["serving_offline"] = report["results"]["serving_offline_ratio"]
    peer = report["peer"]
    if peer and inf and peer.get("output_tok_s"):
        report["ratios"]["serving_output_tok_s_vs_peer"] = round(inf / peer["output_tok_s"], 3)
    return report.finish()


if __name__ == "__main__":
    install_signal_handlers()
    raise SystemExit(main())
