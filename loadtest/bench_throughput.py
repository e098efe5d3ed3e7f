"""T1 / T2: offline throughput. Every request is queued at once and the engine batches continuously.

    T1 (nano-vllm's workload): python loadtest/bench_throughput.py --workload t1 --peer hf,hf-cb --out t1.json
    T2 (vLLM's default):       python loadtest/bench_throughput.py --workload t2 --peer hf,hf-cb --out t2.json

T1: Qwen3-0.6B shape, 256 sequences, prompt and output lengths uniform in [100, 1024], ids in [0, 10000),
output tok/s over the whole run. T2: Llama-3-8B shape, 1000 requests of 1024 prompt / 128 output tokens,
req/s, output tok/s, total tok/s. Warm-up (on different prompts) is excluded from the timing. Peers: hf
(transformers generate() in static batches) and hf-cb (its continuous batching, loadtest/hf_cb_peer.py);
`peers` in the JSON holds each, `peer` the first, and `ratios` each ratio. `weir bench throughput` runs this.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.common import (  # noqa: E402
    Report,
    Workload,
    add_common_args,
    add_peer_last_arg,
    allocator_stats,
    build_llm,
    copy_bandwidth_phase,
    default_max_model_len,
    engine_info,
    engine_kwargs,
    free_engine,
    install_signal_handlers,
    parse_len,
    phase,
    profile_rows,
    random_workload,
    ratio,
    resolve_model,
    sampling_params,
    step_loop_delta,
)
from loadtest.hf_cb_peer import add_hf_cb_args, run_hf_cb_peer  # noqa: E402
from loadtest.hf_peer import run_peer  # noqa: E402

WORKLOADS = {
    "t1": {"shape": "qwen3-0.6b", "num_requests": 256, "input_len": "100:1024", "output_len": "100:1024"},
    "t2": {"shape": "llama3-8b", "num_requests": 1000, "input_len": "1024", "output_len": "128"},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="t1")
    p.add_argument("--num-requests", "--num-prompts", dest="num_requests", type=int, default=None)
    add_random_dataset_args(p)
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed run, run the workload again under cProfile and report its top N functions "
        "by own and by cumulative time (where the host's time goes; the timed figures are not affected)",
    )
    add_common_args(p, peers=("hf", "hf-cb"))
    add_peer_last_arg(p)
    add_hf_cb_args(p)
    return p


def add_random_dataset_args(p: argparse.ArgumentParser) -> None:
    """The workload's lengths, under weir's names and `vllm bench`'s (--random-input-len etc.)."""
    p.add_argument(
        "--dataset-name", choices=("random",), default="random", help="random token ids (as vLLM's)"
    )
    p.add_argument(
        "--input-len",
        "--random-input-len",
        dest="input_len",
        type=parse_len,
        default=None,
        help="N or LO:HI (uniform, inclusive)",
    )
    p.add_argument(
        "--output-len",
        "--random-output-len",
        dest="output_len",
        type=parse_len,
        default=None,
        help="N or LO:HI (uniform, inclusive)",
    )
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="as vLLM's: a length N becomes uniform in [N(1-r), N(1+r)]",
    )
    p.add_argument("--token-id-max", type=int, default=10000, help="prompt ids uniform in [0, this)")


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    """The workload's requests from the flags (shared with bench_serving, which sends T2's requests)."""
    spec = WORKLOADS[args.workload]
    num = args.num_requests or spec["num_requests"]
    ratio_ = getattr(args, "random_range_ratio", 0.0) or 0.0
    input_len = widen(args.input_len or parse_len(spec["input_len"]), ratio_)
    output_len = widen(args.output_len or parse_len(spec["output_len"]), ratio_)
    workload = random_workload(num, input_len, output_len, args.seed, min(args.token_id_max, vocab_size))
    workload.description["workload"] = args.workload
    return workload


def widen(lens: tuple[int, int], range_ratio: float) -> tuple[int, int]:
    """vLLM's --random-range-ratio: (N, N) -> (N(1-r), N(1+r)), at least 1; a LO:HI range stays as given."""
    lo, hi = lens
    if not range_ratio or lo != hi:
        return lens
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    return max(1, round(lo * (1 - range_ratio))), max(1, round(hi * (1 + range_ratio)))


def warmup_workload(workload: Workload, n: int, seed: int, vocab_size: int) -> Workload:
    """Different ids than the timed prompts (so the prefix cache cannot help the run), short outputs."""
    lens = sorted({len(p) for p in workload.prompts})
    return random_workload(
        max(1, min(n, len(workload))),
        (lens[0], lens[-1]),
        (4, 16),
        seed=seed + 1_000_003,
        token_id_max=min(vocab_size, 10000),
    )


def run_offline(llm: object, workload: Workload, temperature: float) -> dict:
    """Generate the whole workload at once; returns the throughput figures."""
    params = [sampling_params(o, temperature) for o in workload.output_lens]
    times = getattr(getattr(llm, "llm_engine", None), "step_times", None)
    before = times.as_dict() if times is not None else None
    alloc_before = allocator_stats()
    t0 = time.perf_counter()
    outs = llm.generate(workload.prompts, params, use_tqdm=False)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - t0
    after = times.as_dict() if times is not None else None
    alloc_after = allocator_stats()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = workload.num_prompt_tokens
    errors = [o.error for o in outs if getattr(o, "error", None)]
    return {
        "elapsed_s": round(elapsed, 4),
        "num_requests": len(outs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "expected_output_tokens": workload.num_output_tokens,
        "req_s": round(len(outs) / elapsed, 4),
        "output_tok_s": round(out_tokens / elapsed, 2),
        "total_tok_s": round((out_tokens + prompt_tokens) / elapsed, 2),
        "failed_requests": len(errors),
        "first_error": errors[0] if errors else None,
        # The engine's step phases during the run, to set against S1's (where the server's time goes).
        "step_loop_s": step_loop_delta(before, after),
        # The caching allocator during the run (CUDA): retries synchronize the device inside a launch.
        "cuda_allocator_during_run": {k: v - alloc_before.get(k, 0) for k, v in alloc_after.items()},
    }


def profile_offline(llm: object, workload: Workload, temperature: float, top: int) -> dict:
    """The workload once more under cProfile: its figures (slower than the timed run's) and the top
    functions, for finding the host's share of a step (loadtest/profile_host.py does B1 and B2)."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        res = run_offline(llm, workload, temperature)
    finally:
        prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    for row in (rows := profile_rows(stats, "tottime", top))[:25]:
        print(
            f"{row['own_s']:8.3f} {row['cumulative_s']:8.3f} {row['calls']:8d}  {row['function']}", flush=True
        )
    return {
        "elapsed_s_under_profiler": res["elapsed_s"],
        "step_loop_s": res["step_loop_s"],
        "by_own_time": rows,
        "by_cumulative_time": profile_rows(stats, "cumulative", top),
    }


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    args._default_shape = WORKLOADS[args.workload]["shape"]
    model = resolve_model(args)
    workload = make_workload(args, model.vocab_size)
    bench = args.workload.upper()
    report = Report(bench, args, model)
    report["workload"] = workload.description
    print(f"[{bench}] {len(workload)} requests, {model.describe()}", flush=True)
    copy_bandwidth_phase(report, model.device, args.copy_bytes)
    peer = None if args.peer_last else run_peer(report, model, args, workload, min(len(workload), 256))

    max_model_len = default_max_model_len(args, model, workload.max_seq_len)
    kwargs = engine_kwargs(args, model, max_model_len=max_model_len)
    report["engine_kwargs"] = kwargs
    llm = None
    try:
        with phase(report, "engine_build"):
            llm, build_s = build_llm(model, kwargs)
            report["results"]["engine_build_s"] = round(build_s, 3)
            report["engine"] = engine_info(llm)
        with phase(report, "warmup"):
            run_offline(
                llm, warmup_workload(workload, args.warmup_requests, args.seed, model.vocab_size), 1.0
            )
        with phase(report, "run"):
            res = run_offline(llm, workload, args.temperature)
            report["results"].update(res)
            stats = getattr(llm.llm_engine, "stats", None)
            if callable(stats):
                s = stats()
                report["results"]["engine_stats"] = (
                    dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s
                )
            if res["output_tokens"] != res["expected_output_tokens"]:
                report.note("generated token count differs from the workload's (ignore_eos not honoured?)")
            if res["failed_requests"]:
                raise RuntimeError(f"{res['failed_requests']} requests failed: {res['first_error']}")
        if args.host_profile:
            with phase(report, "host_profile", required=False):
                report["host_profile"] = profile_offline(llm, workload, args.temperature, args.host_profile)
        print(
            f"[{bench}] {res['req_s']:.2f} req/s, {res['output_tok_s']:.1f} output tok/s, "
            f"{res['total_tok_s']:.1f} total tok/s in {res['elapsed_s']:.1f}s",
            flush=True,
        )
    except Exception:  # noqa: BLE001 - recorded by phase(); the report is still written
        pass
    finally:
        if llm is not None:
            free_engine(llm)
    if args.peer_last:
        peer = run_peer(report, model, args, workload, min(len(workload), 256))
    # The continuous-batching peer runs last: the slowest phase, so a timeout loses only its figure.
    warm = warmup_workload(
        workload, max(args.warmup_requests, args.hf_cb_warmup_requests), args.seed, model.vocab_size
    )
    cb_peer = run_hf_cb_peer(report, model, args, workload, warm)
    peers = {name: res for name, res in (("hf", peer), ("hf-cb", cb_peer)) if res}
    if peers:
        report["peers"] = peers
        report["peer"] = peer or cb_peer  # the summary's peer column: generate() when it ran
    res = report["results"]
    if report["peer"]:
        first = report["peer"]
        report["ratios"] = {
            "output_tok_s_vs_peer": ratio(res.get("output_tok_s"), first["output_tok_s"]),
            "req_s_vs_peer": ratio(res.get("req_s"), first["req_s"]),
            "total_tok_s_vs_peer": ratio(res.get("total_tok_s"), first["total_tok_s"]),
        }
    for name, theirs in peers.items():
        key = name.replace("-", "_")
        report["ratios"][f"output_tok_s_vs_{key}"] = ratio(res.get("output_tok_s"), theirs["output_tok_s"])
        report["ratios"][f"req_s_vs_{key}"] = ratio(res.get("req_s"), theirs["req_s"])
    return report.finish()


if __name__ == "__main__":
    install_signal_handlers()
    raise SystemExit(main())
