"""P1: prefix caching. 200 requests sharing one 2,000-token system prompt plus 100 own tokens each, 64
output tokens, Llama-3-8B shape: TTFT p50 and throughput with prefix caching on vs off.

    python loadtest/bench_prefix.py --shape llama3-8b --peer hf --out p1.json

Per mode, after a warm-up on a different shared prefix: every request is queued at once (TTFT from the
engine's per-request metrics, first token minus arrival), then a few single requests on the same prefix
are timed alone (TTFT without queueing). On a GPU each mode runs in its own process, so the second engine
gets the whole device.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.common import (  # noqa: E402
    REPO_ROOT,
    Report,
    Workload,
    add_common_args,
    allocator_stats,
    build_llm,
    copy_bandwidth_phase,
    default_max_model_len,
    engine_info,
    engine_kwargs,
    free_engine,
    install_signal_handlers,
    phase,
    ratio,
    resolve_model,
    sampling_params,
    shared_prefix_workload,
    summarize_ms,
)
from loadtest.hf_peer import run_peer  # noqa: E402
from loadtest.server_process import _die_with_parent  # noqa: E402

MODES = ("on", "off")
_PHASES = ("schedule", "launch", "device_wait", "update")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--prefix-len", type=int, default=2000)
    p.add_argument("--suffix-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--token-id-max", type=int, default=10000)
    p.add_argument("--warmup-requests", type=int, default=8)
    p.add_argument("--single-iters", type=int, default=5, help="lone requests timed after the batch run")
    p.add_argument(
        "--isolate",
        choices=("auto", "process", "none"),
        default="auto",
        help="auto: a process per mode on cuda",
    )
    p.add_argument("--only-mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    add_common_args(p, default_shape="llama3-8b")
    return p


def make_workload(
    args: argparse.Namespace, vocab_size: int, seed: int | None = None, n: int | None = None
) -> Workload:
    return shared_prefix_workload(
        n or args.num_requests,
        args.prefix_len,
        args.suffix_len,
        args.output_len,
        args.seed if seed is None else seed,
        min(args.token_id_max, vocab_size),
    )


def single_ttft(engine: Any, prefix: list[int], args: argparse.Namespace, id_max: int, tag: str) -> float:
    """TTFT of one request alone: from add_request to the step that produced its first token."""
    rng = random.Random(zlib.crc32(tag.encode()))
    prompt = prefix + [rng.randrange(id_max) for _ in range(args.suffix_len)]
    t0 = time.perf_counter()
    engine.add_request(tag, prompt, sampling_params(2, args.temperature))
    first = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and any(o.outputs[0].token_ids for o in outs):
            first = time.perf_counter()
    return (first or time.perf_counter()) - t0


def run_mode(args: argparse.Namespace, model: Any, workload: Workload, mode: str) -> dict[str, Any]:
    kwargs = engine_kwargs(
        args,
        model,
        max_model_len=default_max_model_len(args, model, workload.max_seq_len),
        enable_prefix_caching=(mode == "on"),
    )
    id_max = min(args.token_id_max, model.vocab_size)
    llm, build_s = build_llm(model, kwargs)
    try:
        warm = make_workload(args, model.vocab_size, seed=args.seed + 7919, n=args.warmup_requests)
        warm_params = [sampling_params(4, 1.0)] * len(warm)
        llm.generate(warm.prompts, warm_params, use_tqdm=False)
        llm.generate(warm.prompts[:2], warm_params[:2], use_tqdm=False)  # a second pass: the hit path
        params = [sampling_params(o, args.temperature) for o in workload.output_lens]
        # Where the queued run's TTFT goes: each engine step's wall time (the first ones hold every prefill)
        # and when first tokens and arrivals fall, from the run's start.
        engine = llm.llm_engine
        step_ms: list[float] = []
        # Each trip's phases (ms): under async scheduling a trip launches step N and waits for N-1, so a
        # launch as long as its step means the launch itself waited for the device (its first tokens
        # would then reach the requests a step late).
        trip_phases: list[dict[str, float]] = []
        plain_step = engine.step
        times = engine.step_times

        def timed_step() -> Any:
            start = time.perf_counter()
            before = [getattr(times, k) for k in _PHASES]
            try:
                return plain_step()
            finally:
                step_ms.append((time.perf_counter() - start) * 1000)
                if len(trip_phases) < 12:
                    trip_phases.append(
                        {
                            k: round((getattr(times, k) - b) * 1000, 3)
                            for k, b in zip(_PHASES, before, strict=True)
                        }
                    )

        engine.step = timed_step
        alloc_before = allocator_stats()
        t0, t0_mono = time.perf_counter(), time.monotonic()
        try:
            outs = llm.generate(workload.prompts, params, use_tqdm=False)
        finally:
            del engine.step  # the class's own again
        elapsed = time.perf_counter() - t0
        alloc_after = allocator_stats()
        timed = [o.metrics for o in outs if o.metrics is not None and o.metrics.first_token_time is not None]
        ttfts = [m.first_token_time - m.arrival_time for m in timed]
        first_at = [m.first_token_time - t0_mono for m in timed]
        arrivals = [m.arrival_time - t0_mono for m in timed]
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        cached = [o.num_cached_tokens for o in outs]
        prefix = workload.prompts[0][: args.prefix_len]
        singles = [
            single_ttft(llm.llm_engine, prefix, args, id_max, f"single-{mode}-{i}")
            for i in range(args.single_iters)
        ]
        return {
            "enable_prefix_caching": mode == "on",
            "engine_build_s": round(build_s, 3),
            "engine": engine_info(llm),
            "elapsed_s": round(elapsed, 4),
            **summarize_ms(ttfts, "ttft"),
            "first_token_after_start": summarize_ms(first_at, "at"),
            "last_arrival_after_start_ms": round(max(arrivals) * 1000, 3) if arrivals else None,
            "first_steps_ms": [round(x, 3) for x in step_ms[:12]],
            "first_trip_phases_ms": trip_phases,
            # (CUDA) an alloc retry synchronizes the device inside the launch that allocates
            "cuda_allocator_during_run": {k: v - alloc_before.get(k, 0) for k, v in alloc_after.items()},
            "steps": len(step_ms),
            "output_tokens": out_tokens,
            "output_tok_s": round(out_tokens / elapsed, 2),
            "req_s": round(len(outs) / elapsed, 4),
            "total_tok_s": round((out_tokens + workload.num_prompt_tokens) / elapsed, 2),
            "cached_tokens_mean": round(statistics.fmean(cached), 2) if cached else None,
            "requests_with_cache_hit": sum(1 for c in cached if c > 0),
            "single_ttft_ms_median": round(statistics.median(singles) * 1000, 4) if singles else None,
            "single_ttft_ms_all": [round(s * 1000, 4) for s in singles],
        }
    finally:
        free_engine(llm)


def run_mode_in_child(argv: list[str], mode: str) -> dict[str, Any]:
    """Run one mode in a fresh process (the engine's device memory goes with it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"p1-{mode}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *argv,
            *("--only-mode", mode, "--out", str(out), "--peer", "none", "--isolate", "none"),
        ]
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None
        )
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not out.is_file():
            raise RuntimeError(f"the {mode} run exited with {rc} and wrote no report")
        child = json.loads(out.read_text())
        if mode not in child["results"]:
            raise RuntimeError(f"the {mode} run failed: {'; '.join(child.get('errors') or [])}")
        return child["results"][mode]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    model = resolve_model(args)
    workload = make_workload(args, model.vocab_size)
    report = Report("P1", args, model)
    report["workload"] = workload.description
    if args.only_mode:  # a child of the parent run: one mode, nothing else
        try:
            with phase(report, f"mode_{args.only_mode}"):
                report["results"][args.only_mode] = run_mode(args, model, workload, args.only_mode)
        except Exception:  # noqa: BLE001 - recorded by phase()
            pass
        return report.finish()

    isolate = args.isolate if args.isolate != "auto" else ("process" if model.device == "cuda" else "none")
    report["isolation"] = isolate
    # The engines first, so this process holds no device memory (not even a CUDA context) while they run.
    for mode in MODES:
        try:
            with phase(report, f"mode_{mode}"):
                if isolate == "process":
                    report["results"][mode] = run_mode_in_child(argv, mode)
                else:
                    report["results"][mode] = run_mode(args, model, workload, mode)
                r = report["results"][mode]
                print(
                    f"[P1] prefix caching {mode}: TTFT p50 {r['ttft_p50_ms']} ms, {r['output_tok_s']} output tok/s, "
                    f"single-request TTFT {r['single_ttft_ms_median']} ms",
                    flush=True,
                )
        except Exception:  # noqa: BLE001 - recorded by phase()
            pass
    copy_bandwidth_phase(report, model.device, args.copy_bytes)
    run_peer(report, model, args, workload, default_batch=min(len(workload), 256))
    on, off = report["results"].get("on"), report["results"].get("off")
    if on and off:
        report["results"]["ttft_p50_speedup"] = ratio(off["ttft_p50_ms"], on["ttft_p50_ms"])
        report["results"]["single_ttft_speedup"] = ratio(
            off["single_ttft_ms_median"], on["single_ttft_ms_median"]
        )
        report["results"]["throughput_speedup"] = ratio(on["output_tok_s"], off["output_tok_s"])
        report["ratios"].update(
            ttft_p50_off_over_on=report["results"]["ttft_p50_speedup"],
            throughput_on_over_off=report["results"]["throughput_speedup"],
        )
    peer = report["peer"]
    if peer and on:
        report["ratios"]["on_output_tok_s_vs_peer"] = ratio(on["output_tok_s"], peer["output_tok_s"])
        report["ratios"]["peer_ttft_p50_over_on"] = ratio(peer["ttft_p50_ms"], on["ttft_p50_ms"])
    if not (on and off):
        report.error("modes", RuntimeError("both modes must finish"))
    return report.finish()


if __name__ == "__main__":
    install_signal_handlers()
    raise SystemExit(main())
