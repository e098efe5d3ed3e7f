"""S1: serving through HTTP + SSE. T2's requests (Llama-3-8B shape, 1024 prompt / 128 output tokens) sent
to a running `weir serve` by a streaming async httpx client: all at once (rate inf) and as a Poisson
process at 16 req/s. Reports output tok/s, TTFT p50/p99, inter-token latency p50/p99, and the
serving/offline ratio (S1 at rate inf / T2 output tok/s).

    python loadtest/bench_serving.py --shape llama3-8b --offline-json t2.json --out s1.json

Starts `weir serve` itself (dummy weights for a --shape) unless --url names a running server. The offline
figure comes from T2's JSON (--offline-json), else is measured here first, in this process, on the same
requests. Every SSE chunk carrying a choice is a token event, as in `vllm bench serve`; a stream without
`data: [DONE]` or with an error event fails its request.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.bench_throughput import make_workload, run_offline, warmup_workload  # noqa: E402
from loadtest.common import (  # noqa: E402
    Report,
    ServerProcess,
    StreamResult,
    Workload,
    add_common_args,
    build_llm,
    copy_bandwidth_phase,
    default_max_model_len,
    engine_kwargs,
    first_model_id,
    free_engine,
    install_signal_handlers,
    parse_len,
    phase,
    raise_fd_limit,
    resolve_model,
    run_peer,
    server_flags,
    stream_completion,
    summarize_ms,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start `weir serve` here)")
    p.add_argument("--request-rates", default="inf,16", help="comma-separated req/s; inf sends all at once")
    p.add_argument("--num-requests", type=int, default=None, help="default: T2's 1000")
    p.add_argument(
        "--num-requests-finite-rate",
        type=int,
        default=None,
        help="requests sent at each finite rate (fresh prompts of the same shape; default: as many as T2)",
    )
    p.add_argument("--input-len", type=parse_len, default=None)
    p.add_argument("--output-len", type=parse_len, default=None)
    p.add_argument("--token-id-max", type=int, default=10000)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup-requests", type=int, default=8)
    p.add_argument("--offline-json", default=None, help="T2's report; its output tok/s is the offline figure")
    p.add_argument(
        "--offline", choices=("auto", "none"), default="auto", help="none: skip the offline figure"
    )
    p.add_argument("--served-model-name", default="weir-bench")
    p.add_argument("--server-log", default=None)
    p.add_argument("--server-timeout", type=float, default=600.0)
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra `weir serve` argument (repeatable)"
    )
    add_common_args(p, default_shape="llama3-8b")
    return p


def rate_label(rate: float) -> str:
    if rate == float("inf"):
        return "rate_inf"
    return f"rate_{int(rate)}" if rate == int(rate) else f"rate_{rate:g}"


async def run_rate(
    url: str,
    model_name: str,
    workload: Workload,
    rate: float,
    temperature: float,
    seed: int,
    max_concurrency: int | None = None,
) -> list[StreamResult]:
    """Send every request of the workload at `rate` (Poisson arrivals; inf: all at once)."""
    import httpx

    n = len(workload)
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    timeout = httpx.Timeout(None, connect=60.0)
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> StreamResult:
        payload = {
            "model": model_name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if sem is None:
            res = await stream_completion(client, payload)
        else:
            async with sem:
                res = await stream_completion(client, payload)
        if res.ok and not res.output_tokens:
            res.output_tokens = max_tokens  # ignore_eos: every request runs to max_tokens
        res.prompt_tokens = res.prompt_tokens or len(prompt)
        return res

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        tasks = []
        for prompt, out_len in zip(workload.prompts, workload.output_lens, strict=True):
            tasks.append(asyncio.create_task(one(client, prompt, out_len)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


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
    }


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.workload = "t2"
    model = resolve_model(args)
    workload = make_workload(args, model.vocab_size)
    rates = [float(r) for r in args.request_rates.split(",") if r.strip()]
    report = Report("S1", args, model)
    report["workload"] = {**workload.description, "request_rates": [str(r) for r in rates]}
    mml = default_max_model_len(args, model, workload.max_seq_len)
    raise_fd_limit()

    offline_figure(report, args, model, workload, mml)
    if report["peer"] is None:
        run_peer(report, model, args, workload, default_batch=min(len(workload), 256))

    server = None
    try:
        url = args.url
        if url is None:
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
        model_name = args.served_model_name if server else (first_model_id(url) or args.served_model_name)
        with phase(report, "warmup"):
            warm = warmup_workload(workload, args.warmup_requests, args.seed, model.vocab_size)
            res = asyncio.run(run_rate(url, model_name, warm, float("inf"), 1.0, args.seed))
            bad = [r.error for r in res if not r.ok]
            if bad:
                raise RuntimeError(f"{len(bad)} warm-up requests failed: {bad[0]}")
        for k, rate in enumerate(rates):
            # Each rate gets its own random prompts of T2's shape (seed + k): the previous rate's prompts
            # may still sit in the prefix cache, and hits would flatter TTFT.
            wl = workload
            if k > 0:
                wl = make_workload(
                    argparse.Namespace(**{**vars(args), "seed": args.seed + k}), model.vocab_size
                )
            if rate != float("inf"):
                wl = wl.head(args.num_requests_finite_rate)
            label = rate_label(rate)
            try:  # a failed rate is recorded; the next one still runs
                with phase(report, label):
                    t0 = time.perf_counter()
                    results = asyncio.run(
                        run_rate(url, model_name, wl, rate, args.temperature, args.seed, args.max_concurrency)
                    )
                    summary = summarize(results, time.perf_counter() - t0, rate)
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
