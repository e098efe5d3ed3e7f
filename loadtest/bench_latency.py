"""L1: single-stream latency. Batch 1 and 8, 32 prompt / 128 output tokens, Llama-3-8B shape.

    python loadtest/bench_latency.py --shape llama3-8b --peer hf --out l1.json

Drives the step-level engine directly (add_request, then step() until done) and timestamps every step
that produced tokens: inter-token latency is the gap between consecutive such steps. Reports the median
ITL (ms), tok/s (batch x output tokens / end-to-end latency), and the fraction of the bandwidth roofline
(weight bytes / measured copy bandwidth, divided by the measured ITL; for an MoE model the bytes of the
experts a step at that batch size reads, loadtest/model_shapes.active_parameters). Warm-up iterations
are excluded. --peer-last runs the transformers peer after weir's figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.common import (  # noqa: E402
    Report,
    add_common_args,
    add_peer_last_arg,
    build_llm,
    copy_bandwidth_phase,
    default_max_model_len,
    engine_info,
    engine_kwargs,
    engine_runner,
    free_engine,
    install_signal_handlers,
    phase,
    ratio,
    resolve_model,
    sampling_params,
    step_loop_delta,
    summarize_ms,
)
from loadtest.hf_peer import HFPeer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", "--batch-size", dest="batch_sizes", default="1,8", help="comma-separated")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=5, help="timed iterations per batch size")
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--token-id-max", type=int, default=10000)
    add_common_args(p, default_shape="llama3-8b")
    add_peer_last_arg(p)
    return p


def make_prompts(n: int, length: int, seed: int, id_max: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(id_max) for _ in range(length)] for _ in range(n)]


def timed_iteration(engine: Any, prompts: list[list[int]], params: Any, tag: str) -> dict[str, Any]:
    """Queue the batch, step until done; times of every step that produced tokens."""
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    t0 = time.perf_counter()
    token_times: list[float] = []
    tokens = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        new = sum(len(o.outputs[0].token_ids_delta) for o in outs)
        if new:
            token_times.append(time.perf_counter())
            tokens += new
    end = time.perf_counter()
    return {
        "ttft": token_times[0] - t0 if token_times else None,
        "gaps": [b - a for a, b in zip(token_times, token_times[1:], strict=False)],
        "latency": end - t0,
        "tokens": tokens,
    }


def measure_engine(engine: Any, args: argparse.Namespace, bs: int, id_max: int) -> dict[str, Any]:
    params = sampling_params(args.output_len, args.temperature)
    for w in range(args.num_iters_warmup):
        warm = make_prompts(bs, args.input_len, 10_000_000 + bs * 100 + w, id_max)
        timed_iteration(engine, warm, params, f"w{bs}-{w}")
    iters = []
    times = getattr(engine, "step_times", None)
    before = times.as_dict() if times is not None else None
    for it in range(args.num_iters):
        # Fresh prompts each iteration: a prefix-cache hit would skip the prefill being measured.
        prompts = make_prompts(bs, args.input_len, args.seed * 100_000 + bs * 100 + it, id_max)
        iters.append(timed_iteration(engine, prompts, params, f"b{bs}-{it}"))
    after = times.as_dict() if times is not None else None
    gaps = [g for r in iters for g in r["gaps"]]
    latency = statistics.median(r["latency"] for r in iters)
    tokens = iters[0]["tokens"]
    res = {
        **summarize_ms(gaps, "itl"),
        **summarize_ms([r["ttft"] for r in iters if r["ttft"] is not None], "ttft"),
        "latency_s_median": round(latency, 5),
        "latency_s_all": [round(r["latency"], 5) for r in iters],
        "output_tokens": tokens,
        "tok_s": round(tokens / latency, 2),
        # The engine's step phases over the measured iterations: device_wait near the whole means the
        # device set the pace; schedule, launch and update are host time the device may have waited for.
        "step_loop_s": step_loop_delta(before, after),
    }
    if res["itl_p50_ms"]:
        res["decode_tok_s"] = round(bs * 1000.0 / res["itl_p50_ms"], 2)
    if tokens != bs * args.output_len:
        res["warning"] = f"generated {tokens} tokens, expected {bs * args.output_len}"
    return res


def measure_peer(peer: HFPeer, args: argparse.Namespace, bs: int, id_max: int) -> dict[str, Any]:
    """The peer on the same batch: ITL from its per-token clock, latency (extrapolated if step-capped)."""
    prompts = make_prompts(bs, args.input_len, args.seed * 1000, id_max)
    peer.generate_batch([p[:8] for p in prompts], 4, args.temperature)  # warm-up
    r = peer.generate_batch(prompts, args.output_len, args.temperature, args.peer_max_steps)
    tokens = bs * args.output_len
    return {
        **summarize_ms(r["gaps_s"], "itl"),
        "ttft_p50_ms": round(r["prefill_s"] * 1000, 4),
        "latency_s_median": round(r["batch_s"], 5),
        "output_tokens": tokens,
        "tok_s": round(tokens / r["batch_s"], 2),
        "steps_run": r["steps_run"],
        "extrapolated": r["steps_run"] < args.output_len,
    }


def run_latency_peer(
    report: Report, model: Any, args: argparse.Namespace, batch_sizes: list[int], id_max: int
) -> None:
    """transformers generate() on each batch size (with --peer hf), a non-fatal phase."""
    if args.peer != "hf":
        return
    with phase(report, "peer", required=False):
        peer = HFPeer(model, seed=args.seed)
        try:
            report["peer"] = {
                "name": "transformers generate()",
                "model_build_s": round(peer.build_seconds, 3),
            }
            for bs in batch_sizes:
                report["peer"][f"batch_{bs}"] = measure_peer(peer, args, bs, id_max)
                report.save()
        finally:
            peer.close()
        if args.peer_max_steps and args.peer_max_steps < args.output_len:
            report.note(f"peer latency extrapolated from {args.peer_max_steps} timed decode steps")


def engine_weight_bytes(llm: Any) -> int | None:
    """Bytes of the engine's own parameters, when its model is reachable (cross-checks the config count)."""
    model = getattr(engine_runner(llm), "model", None)
    if model is None:
        return None
    try:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    except Exception:  # noqa: BLE001
        return None


def _figures(ms: float) -> float:
    """Five significant figures: a tiny CPU shape's roofline is a few microseconds (0.0040412 ms), where
    four decimals would leave one digit (and the batch ratio the smoke test checks off by 1.5%)."""
    return float(f"{ms:.5g}")


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    model = resolve_model(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    id_max = min(args.token_id_max, model.vocab_size)
    report = Report("L1", args, model)
    report["workload"] = {
        "batch_sizes": batch_sizes,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_iters": args.num_iters,
        "num_iters_warmup": args.num_iters_warmup,
        "temperature": args.temperature,
    }
    bw = copy_bandwidth_phase(report, model.device, args.copy_bytes)
    # ms per decode step at batch bs: the weights it reads over the copy bandwidth (every parameter for a
    # dense model; for an MoE model the experts bs tokens choose, model_shapes.active_parameters)
    roofline = (
        {bs: model.step_weight_bytes(bs) / bw["bytes_per_s"] * 1000 for bs in batch_sizes} if bw else {}
    )
    roofline_ms = model.step_weight_bytes(1) / bw["bytes_per_s"] * 1000 if bw else None
    if roofline_ms:
        moe = model.step_weight_bytes(1) < model.weight_bytes
        report["roofline"] = {
            "weight_bytes": round(model.step_weight_bytes(1)),
            "ms_per_step": _figures(roofline_ms),
            "note": "every parameter read once per decode step (embedding included, as vLLM's anchor counts)"
            + (
                "; MoE: batch 1 reads top_k experts a layer, batch bs the expected distinct experts of bs "
                "uniformly routed tokens (results' roofline_ms per batch)"
                if moe
                else ""
            ),
        }
        print(
            f"[L1] roofline {roofline_ms:.3f} ms/step ({model.step_weight_bytes(1) / 1e9:.2f} GB of weights)",
            flush=True,
        )

    if not args.peer_last:
        run_latency_peer(report, model, args, batch_sizes, id_max)

    max_model_len = default_max_model_len(args, model, args.input_len + args.output_len)
    kwargs = engine_kwargs(args, model, max_model_len=max_model_len)
    report["engine_kwargs"] = kwargs
    llm = None
    try:
        with phase(report, "engine_build"):
            llm, build_s = build_llm(model, kwargs)
            report["results"]["engine_build_s"] = round(build_s, 3)
            report["results"]["engine_weight_bytes"] = engine_weight_bytes(llm)
            report["engine"] = engine_info(llm)
        for bs in batch_sizes:
            with phase(report, f"batch_{bs}"):
                res = measure_engine(llm.llm_engine, args, bs, id_max)
                if roofline and res["itl_p50_ms"]:
                    res["roofline_ms"] = _figures(roofline[bs])
                    res["roofline_fraction"] = round(roofline[bs] / res["itl_p50_ms"], 4)
                report["results"][f"batch_{bs}"] = res
                print(
                    f"[L1] batch {bs}: ITL p50 {res['itl_p50_ms']:.3f} ms, {res['tok_s']:.1f} tok/s, "
                    f"roofline fraction {res.get('roofline_fraction')}",
                    flush=True,
                )
    except Exception:  # noqa: BLE001 - recorded by phase()
        pass
    finally:
        if llm is not None:
            free_engine(llm)
    if args.peer_last:
        run_latency_peer(report, model, args, batch_sizes, id_max)
    peer = report["peer"]
    if peer:
        for bs in batch_sizes:
            ours, theirs = report["results"].get(f"batch_{bs}"), peer.get(f"batch_{bs}")
            if ours and theirs:
                report["ratios"][f"batch_{bs}_tok_s_vs_peer"] = ratio(ours["tok_s"], theirs["tok_s"])
                report["ratios"][f"batch_{bs}_peer_itl_over_ours"] = ratio(
                    theirs["itl_p50_ms"], ours["itl_p50_ms"]
                )
    return report.finish()


if __name__ == "__main__":
    install_signal_handlers()
    raise SystemExit(main())
