"""Where an engine step's device time goes, by kernel family, for T2's two kinds of step (K); with
`--mode batch1`, L1's graphed batch-1 decode step kernel by kernel (K1, loadtest/decode_breakdown.py).

    python loadtest/profile_kernels.py --shape llama3-8b --out profile_kernels.json
    python loadtest/profile_kernels.py --mode batch1 --shape llama3-8b --input-len 32 --out profile_l1.json

`--beam-width W` makes every request a beam search (B1's step), `--n N` parallel sampling (B2's).

Queues `--num-requests` prompts of `--input-len` tokens (T2's shape: 1024 in), then profiles, with
torch.profiler, a window of full prefill steps (chunked-prefill budget) and, once every prompt is in,
a window of decode steps (every request running, context ~ input length; the batch can be smaller
when the KV cache holds fewer sequences). For each window it reports
wall ms per step, kernel ms per step by family (matmul, attention, kv write, norm, rotary, activation,
sampler, copies, other), the device's busy fraction (kernel time / wall time: below 1 the device
waited for the host), and what the families achieve: matmul TFLOP/s in prefill, attention's KV read
bandwidth in decode. This is the evidence for where T2's time goes against its compute floor.

On CPU (the smoke test) the same windows are profiled with CPU operator times instead of kernels.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import decode_breakdown  # noqa: E402
from loadtest.common import (  # noqa: E402
    Report,
    add_common_args,
    build_llm,
    copy_bandwidth_phase,
    default_max_model_len,
    engine_info,
    engine_kwargs,
    engine_runner,
    free_engine,
    install_signal_handlers,
    phase,
    resolve_model,
    sampling_params,
)
from loadtest.kernel_families import FAMILIES, family_of  # noqa: E402, F401 - re-exported


def layer_params(config: dict[str, Any]) -> int:
    """Weights every token multiplies through one decoder layer (attention and MLP projections)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int) -> int:
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def profile_window(engine: Any, num_steps: int, cuda: bool, drain_first: bool = True) -> dict[str, Any]:
    """Run `num_steps` engine steps under the profiler; per-step wall and kernel time by family.
    `drain_first=False` keeps a step in flight across the window's edges (beam search: draining would
    add a stall that B1 does not have; with --no-beam-device-ranking it would also merge the groups
    that run in two alternating halves into one step); the device is still synchronized at the end,
    so the window holds every kernel it launched."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # Tokens of the steps launched inside the window (counted as they are scheduled).
    scheduled: list[int] = []
    schedule = engine.schedule

    def counting_schedule() -> Any:
        out = schedule()
        scheduled.append(out.total_num_scheduled_tokens)
        return out

    if drain_first:
        engine.flush()  # the window starts with nothing on the device
    if cuda:
        torch.cuda.synchronize()
        with profile(activities=activities):  # CUPTI's one-time start-up (~0.5 s) stays out of the window
            torch.zeros(1, device="cuda").add_(1)
            torch.cuda.synchronize()
    engine.schedule = counting_schedule
    try:
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(num_steps):
                engine.step()
            if drain_first:
                engine.flush()  # async scheduling: the window's last step completes inside it
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    finally:
        del engine.schedule  # back to the class's method
    tokens = sum(scheduled)
    by_family: dict[str, float] = defaultdict(float)
    top: list[tuple[float, str]] = []
    for evt in prof.key_averages():
        if cuda:
            if str(getattr(evt, "device_type", "")).split(".")[-1] != "CUDA":
                continue
            us = float(
                getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0)
            )
        else:
            if not evt.key.startswith("aten::"):
                continue
            us = float(evt.self_cpu_time_total)
        if us <= 0:
            continue
        by_family[family_of(evt.key)] += us
        top.append((us, evt.key))
    busy_ms = sum(by_family.values()) / 1e3
    top.sort(reverse=True)
    host_side = device_gaps(prof, num_steps)  # on CPU: no kernels, no runtime calls
    return {
        **host_side,
        "steps": num_steps,
        "tokens_per_step": round(tokens / num_steps, 1),
        "wall_ms_per_step": round(wall * 1e3 / num_steps, 3),
        "kernel_ms_per_step": round(busy_ms / num_steps, 3),
        "busy_fraction": round(busy_ms / (wall * 1e3), 4) if wall > 0 else None,
        "family_ms_per_step": {k: round(v / 1e3 / num_steps, 3) for k, v in sorted(by_family.items())},
        "top_kernels": [
            {"name": name[:120], "ms_per_step": round(us / 1e3 / num_steps, 3)} for us, name in top[:12]
        ],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=256, help="also the decode batch")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument(
        "--output-len",
        type=int,
        default=256,
        help="long enough that no request ends before the decode window",
    )
    p.add_argument(
        "--mode",
        choices=("t2", "batch1"),
        default="t2",
        help="t2: T2's prefill and decode steps by kernel family (K); batch1: L1's graphed batch-1 decode "
        "step kernel by kernel, with each part's bandwidth and the gaps inside the graph (K1, "
        "loadtest/decode_breakdown.py)",
    )
    p.add_argument(
        "--decode-batch",
        type=int,
        default=1,
        help="batch1 mode: sequences decoding together (L1's batch-8 step: 8); the weights are read once a step",
    )
    p.add_argument(
        "--replay-sizes",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[],
        help="batch1 mode: also time these decode graphs alone, replayed back to back (e.g. 1,2,8,32,256)",
    )
    p.add_argument(
        "--beam-width",
        type=int,
        default=0,
        help="t2 mode: every request a beam search of this width (B1's step: 0 = sampling)",
    )
    p.add_argument("--n", type=int, default=1, help="t2 mode: parallel samples per request (B2's step)")
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="the requests run on random LoRA adapters of this rank on all seven projections (batch1: "
        "one adapter, A3's step; t2: --lora-adapters of them, A1/A2's steps; 0 = no LoRA)",
    )
    p.add_argument(
        "--lora-adapters",
        type=int,
        default=8,
        help="t2 mode with --lora-rank: distinct adapters, request i on adapter i mod N, max_loras N "
        "(A1: 8, A2: 64)",
    )
    p.add_argument("--prefill-steps", type=int, default=3, help="profiled prefill steps")
    p.add_argument("--decode-steps", type=int, default=8, help="profiled decode steps")
    add_common_args(p, default_shape="llama3-8b")
    return p


def device_gaps(prof: Any, num_steps: int) -> dict[str, Any]:
    """Where the device waited for the host: the CUDA runtime calls by host time (a synchronizing one,
    such as cudaEventSynchronize or a pageable cudaMemcpy, shows as a large total), and the idle gaps
    between kernels, the largest with the host operations that began inside them."""
    runtime: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    kernels: list[tuple[float, float]] = []
    host_ops: list[tuple[float, str]] = []
    for evt in prof.events():
        kind = str(getattr(evt, "device_type", "")).split(".")[-1]
        start, end = evt.time_range.start, evt.time_range.end  # us
        if kind == "CUDA":
            kernels.append((start, end))
        elif evt.name.startswith("cuda"):
            runtime[evt.name][0] += 1
            runtime[evt.name][1] += end - start
            host_ops.append((start, evt.name))
        elif evt.name.startswith("aten::"):
            host_ops.append((start, evt.name))
    calls = sorted(runtime.items(), key=lambda kv: -kv[1][1])[:10]
    out: dict[str, Any] = {
        "runtime_calls_per_step": [
            {"name": name, "calls": round(n / num_steps, 1), "host_ms": round(us / 1e3 / num_steps, 3)}
            for name, (n, us) in calls
        ]
    }
    if not kernels:
        return out
    kernels.sort()
    gaps: list[tuple[float, float, float]] = []  # (length, start, end)
    busy_until = kernels[0][1]
    for start, end in kernels[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, busy_until, start))
        busy_until = max(busy_until, end)
    host_ops.sort()
    idle = sum(g[0] for g in gaps)
    largest = sorted(gaps, reverse=True)[:6]
    out["device_idle"] = {
        "ms_per_step": round(idle / 1e3 / num_steps, 3),
        "gaps_over_100us_per_step": round(sum(1 for g in gaps if g[0] > 100) / num_steps, 1),
        "largest": [
            {
                "us": round(length, 1),
                "host_ops_started": [name for t, name in host_ops if g0 <= t < g1][:12],
            }
            for length, g0, g1 in largest
        ],
    }
    return out


def main_batch1(args: argparse.Namespace) -> int:
    """K1: one sequence's decode step (or --decode-batch sequences'), eager (labelled) then graphed; the
    per-part table."""
    model = resolve_model(args)
    report = Report("K1", args, model)
    report["workload"] = {
        "batch": args.decode_batch,
        "input_len": args.input_len,
        "decode_steps": args.decode_steps,
    }
    bw = copy_bandwidth_phase(report, model.device, args.copy_bytes)
    copy_gb_s = bw["GB_s"] if bw else None
    mml = default_max_model_len(args, model, args.input_len + args.output_len)
    llm = None
    tmp = tempfile.TemporaryDirectory(prefix="weir-k1-lora-")
    try:
        lora_request, lora_kwargs = None, {}
        if args.lora_rank:
            from engine import LoRARequest
            from loadtest.bench_lora import write_adapters

            (path,) = write_adapters(Path(tmp.name), model.config, 1, args.lora_rank, model.dtype)
            lora_request = LoRARequest("k1-adapter", 1, str(path))
            lora_kwargs = {"enable_lora": True, "max_loras": 1, "max_lora_rank": args.lora_rank}
            report["workload"]["lora_rank"] = args.lora_rank
        with phase(report, "engine_build"):
            llm, build_s = build_llm(model, engine_kwargs(args, model, max_model_len=mml, **lora_kwargs))
            report["engine"] = {**engine_info(llm), "build_s": round(build_s, 3)}
        with phase(report, "batch1"):
            res = decode_breakdown.run(llm, model, args, copy_gb_s, lora_request)
            if lora_request is not None:
                res["loras_loaded"] = sorted(llm.llm_engine.list_loras())
            report["results"]["batch1"] = res
            graphed = res.get("graphed")
            table = graphed["table"] if graphed else res["eager_step"]
            print(f"[K1] {res['time_source']}, context {res['context_tokens']} tokens", flush=True)
            if res.get("graph_replay_ms") is not None:
                print(f"[K1] the graph alone, replayed back to back: {res['graph_replay_ms']} ms", flush=True)
            print(decode_breakdown.format_table(table), flush=True)
            if graphed:
                print(
                    f"[K1] graph: {graphed['graph']}; outside it {graphed['outside_graph_us_per_step']} us/step; "
                    f"wall {graphed['wall_ms_per_step']} ms/step",
                    flush=True,
                )
            elif model.device == "cuda":
                report.note("no graphed step: CUDA graphs off (--enforce-eager?)")
    except Exception:  # noqa: BLE001 - recorded by phase()
        pass
    finally:
        if llm is not None:
            free_engine(llm)
        tmp.cleanup()
    return report.finish()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "batch1":
        return main_batch1(args)
    model = resolve_model(args)
    report = Report("K", args, model)  # "K" in run_gpu_suite.sh
    report["workload"] = {
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    cuda = model.device == "cuda"
    mml = default_max_model_len(args, model, args.input_len + args.output_len)
    tmp = tempfile.TemporaryDirectory(prefix="weir-k-lora-")
    loras, lora_kwargs = [None], {}
    if args.lora_rank:
        from engine import LoRARequest
        from loadtest.bench_lora import write_adapters

        paths = write_adapters(Path(tmp.name), model.config, args.lora_adapters, args.lora_rank, model.dtype)
        loras = [LoRARequest(f"k-adapter-{i}", i + 1, str(path)) for i, path in enumerate(paths)]
        lora_kwargs = {"enable_lora": True, "max_loras": len(loras), "max_lora_rank": args.lora_rank}
        report["workload"].update(lora_rank=args.lora_rank, lora_adapters=len(loras))
    with phase(report, "engine_build"):
        llm, build_s = build_llm(model, engine_kwargs(args, model, max_model_len=mml, **lora_kwargs))
        report["engine"] = {**engine_info(llm), "build_s": round(build_s, 3)}
    engine = llm.llm_engine
    rng = random.Random(args.seed)
    params = sampling_params(args.output_len, args.temperature)
    if args.beam_width:
        from engine import BeamSearchParams

        params = BeamSearchParams(args.beam_width, args.output_len, ignore_eos=True).to_sampling_params()
    elif args.n > 1:
        params.n = args.n
    report["workload"].update(beam_width=args.beam_width, n=args.n)
    for i in range(args.num_requests):
        prompt = [rng.randrange(model.vocab_size) for _ in range(args.input_len)]
        engine.add_request(f"r{i}", prompt, params, lora_request=loras[i % len(loras)])
    with phase(report, "prefill"):
        engine.step()  # the first step (kernel compiles, allocator growth) is not profiled
        report["results"]["prefill"] = window = profile_window(
            engine, args.prefill_steps, cuda, drain_first=not args.beam_width
        )
        matmul_ms = window["family_ms_per_step"].get("matmul", 0.0)
        flop = 2 * layer_params(model.config) * model.config["num_hidden_layers"] * window["tokens_per_step"]
        if cuda and matmul_ms > 0:
            window["matmul_tflop_s"] = round(flop / (matmul_ms / 1e3) / 1e12, 1)
    with phase(report, "decode"):
        while engine.scheduler.num_waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running.values()
        ):
            engine.step()
        engine.step()  # the first all-decode step
        if not args.beam_width:
            engine.flush()
        running = engine.scheduler.running_context_lengths()  # every running sequence's, beams included
        # Each decode step reads every running sequence's whole context (plus half the window's tokens).
        context = sum(running) + len(running) * (args.decode_steps // 2)
        stalls = engine.pipeline.num_stalls
        report["results"]["decode"] = window = profile_window(
            engine, args.decode_steps, cuda, drain_first=not args.beam_width
        )
        # Trips that only collected a step (the schedule came back empty: every group waited for its
        # results), the device idle meanwhile; B1 itself has 1 in 512 steps.
        window["stalls"] = engine.pipeline.num_stalls - stalls
        window["batch"] = len(running)
        window["mean_context_tokens"] = round(context / max(len(running), 1), 1)
        attention_ms = window["family_ms_per_step"].get("attention", 0.0)
        dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[model.dtype]
        kv_read = kv_bytes_per_token(model.config, dtype_bytes) * context
        window["kv_bytes_per_step"] = kv_read
        window["weight_bytes"] = model.weight_bytes
        if cuda and attention_ms > 0:
            window["attention_kv_gb_s"] = round(kv_read / (attention_ms / 1e3) / 1e9, 1)
    if args.lora_rank:
        manager = getattr(engine_runner(engine), "lora", None)
        report["results"]["lora"] = {
            "adapters_loaded": len(engine.list_loras()),
            "slot_loads": getattr(manager, "num_slot_loads", None),
        }
    for name in ("prefill", "decode"):
        w = report["results"].get(name)
        if w:
            print(
                f"[profile] {name}: {w['tokens_per_step']} tokens/step, wall {w['wall_ms_per_step']} ms, "
                f"kernels {w['kernel_ms_per_step']} ms (busy {w['busy_fraction']}): {w['family_ms_per_step']}",
                flush=True,
            )
    copy_bandwidth_phase(report, model.device, args.copy_bytes)
    tmp.cleanup()
    return report.finish()


if __name__ == "__main__":
    install_signal_handlers()
    raise SystemExit(main())
