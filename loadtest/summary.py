"""The table of every JSON report in a folder: each benchmark's figure, its peer's and the target.

python loadtest/summary.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engine.startup_phases import PHASES as STARTUP_PHASES  # noqa: E402 - plain Python, no torch

_SUMMARY_ROWS: list[tuple[str, str, str, str, str]] = [
    # (benchmark, label, path in results, path in peer (^: in the report), target)
    ("L1", "ITL p50 ms, batch 1", "batch_1.itl_p50_ms", "batch_1.itl_p50_ms", "<= 5.8 ms"),
    ("Q", "Q1 GPTQ ITL b1 / bf16", "vs_bf16.Q1_gptq_w4a16_itl_vs_bf16", "", "<= 0.40"),
    ("Q", "Q1 AWQ ITL b1 / bf16", "vs_bf16.Q1_awq_w4a16_itl_vs_bf16", "", "<= 0.40"),
    ("Q", "Q2 FP8 ITL b1 / bf16", "vs_bf16.Q2_fp8_itl_vs_bf16", "", "<= 0.60"),
    ("Q", "Q3 FP8 T2 tok/s / bf16", "vs_bf16.Q3_fp8_weights_throughput_vs_bf16", "", ">= 1.5"),
    ("Q", "Q3 FP8 + FP8 KV T2 / bf16", "vs_bf16.Q3_fp8_weights_kv_throughput_vs_bf16", "", ">= 1.5"),
    ("Q", "Q4 FP8 KV blocks / bf16", "vs_bf16.Q4_kv_blocks_vs_bf16", "", "2.0"),
    ("Q", "Q4 FP8 KV T2 tok/s / bf16", "vs_bf16.Q4_fp8_kv_throughput_vs_bf16", "", ">= 1.0"),
    ("Q", "Q5 W4A16 b1 bandwidth frac", "vs_bf16.Q5_batch1_bandwidth_fraction_min", "", ">= 0.80"),
    ("A", "A1 tok/s, 8 adapters / base", "A1_8_adapters.vs_base", "", ">= 0.85"),
    ("A", "A2 tok/s, 64 adapters / base", "A2_64_adapters.vs_base", "", ">= 0.75"),
    ("A", "A3 ITL b1, 1 adapter / base", "A3.vs_base", "", "<= 1.15"),
    ("A", "A4 new adapter added ms", "A4.added_ms", "", "<= 100 ms"),
    ("L1", "roofline fraction, batch 1", "batch_1.roofline_fraction", "", ">= 0.92 (issue 17)"),
    ("L1", "tok/s, batch 1", "batch_1.tok_s", "batch_1.tok_s", ""),
    ("L1", "ITL p50 ms, batch 8", "batch_8.itl_p50_ms", "batch_8.itl_p50_ms", ""),
    ("L1", "roofline fraction, batch 8", "batch_8.roofline_fraction", "", ">= 0.90 (issue 17)"),
    ("L1", "tok/s, batch 8", "batch_8.tok_s", "batch_8.tok_s", ""),
    ("T1", "output tok/s", "output_tok_s", "output_tok_s", ">= 15x peer"),
    ("T1", "output tok/s vs HF CB", "output_tok_s", "^peers.hf-cb.output_tok_s", ""),
    ("T2", "req/s", "req_s", "req_s", ""),
    ("T2", "output tok/s", "output_tok_s", "output_tok_s", ">= 8x peer"),
    ("T2", "total tok/s", "total_tok_s", "total_tok_s", ""),
    ("T2", "output tok/s vs HF CB", "output_tok_s", "^peers.hf-cb.output_tok_s", ""),
    ("S1", "output tok/s, rate inf", "rate_inf.output_tok_s", "", ""),
    ("S1", "serving/offline ratio", "serving_offline_ratio", "", ">= 0.95"),
    ("S1", "TTFT p50 ms, rate inf", "rate_inf.ttft_p50_ms", "", ""),
    ("S1", "TTFT p99 ms, rate inf", "rate_inf.ttft_p99_ms", "", ""),
    ("S1", "ITL p50 ms, rate inf", "rate_inf.itl_p50_ms", "", ""),
    ("S1", "ITL p99 ms, rate inf", "rate_inf.itl_p99_ms", "", ""),
    ("S1", "output tok/s, 16 req/s", "rate_16.output_tok_s", "", ""),
    ("S1", "TTFT p50 ms, 16 req/s", "rate_16.ttft_p50_ms", "", ""),
    ("S1", "ITL p50 ms, 16 req/s", "rate_16.itl_p50_ms", "", ""),
    ("P1", "TTFT p50 ms, cache on", "on.ttft_p50_ms", "ttft_p50_ms", ""),
    ("P1", "TTFT p50 ms, cache off", "off.ttft_p50_ms", "", ""),
    ("P1", "TTFT off/on", "ttft_p50_speedup", "", ">= 5x"),
    ("P1", "output tok/s, cache on", "on.output_tok_s", "output_tok_s", ""),
    ("P1", "output tok/s, cache off", "off.output_tok_s", "", ""),
    ("U1", "s to /health 200", "seconds_to_health", "", ""),
    ("U1", "s to first request", "seconds_to_first_request", "", "<= 60 s"),
    ("U1", "server s to listening", "startup_phases.total_s", "", ""),
    *(
        ("U1", f"server phase s: {name}", f"startup_phases.{name}_s", "", "")
        for name in (*STARTUP_PHASES, "other")
    ),
    ("U1", "split s: import torch", "imports_s.torch_s", "", ""),
    ("U1", "split s: weights", "in_process.runner_timings.weights_load_s|in_process.split_s.weights", "", ""),
    ("U1", "split s: KV profile", "in_process.runner_timings.profile_s", "", ""),
    ("U1", "split s: KV allocation", "in_process.runner_timings.kv_alloc_s", "", ""),
    (
        "U1",
        "split s: CUDA graph capture",
        "in_process.runner_timings.cuda_graph_capture_s|in_process.split_s.cuda_graphs",
        "",
        "",
    ),
    ("U1", "split s: engine build total", "in_process.engine_build_s", "", ""),
    ("K", "prefill step ms (8k tokens)", "prefill.wall_ms_per_step", "", ""),
    ("K", "prefill matmul TFLOP/s", "prefill.matmul_tflop_s", "", ""),
    ("K", "prefill busy fraction", "prefill.busy_fraction", "", ""),
    ("K", "decode step ms", "decode.wall_ms_per_step", "", ""),
    ("K", "decode attention KV GB/s", "decode.attention_kv_gb_s", "", ""),
    ("K", "decode busy fraction", "decode.busy_fraction", "", ""),
    ("K1", "step wall ms, batch 1 graphed", "batch1.graphed.wall_ms_per_step", "", ""),
    ("K1", "graph span us", "batch1.graphed.graph.span_us_median", "", ""),
    ("K1", "gaps inside the graph us", "batch1.graphed.graph.gap_us_per_replay", "", ""),
    ("K1", "roofline / graph span", "batch1.graphed.roofline_over_graph_span", "", ""),
    (
        "K1",
        "qkv_proj of copy bandwidth",
        "batch1.graphed.table.qkv_proj.fraction_of_copy_bw|batch1.eager_step.qkv_proj.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "o_proj of copy bandwidth",
        "batch1.graphed.table.o_proj.fraction_of_copy_bw|batch1.eager_step.o_proj.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "gate_up_proj of copy bandwidth",
        "batch1.graphed.table.gate_up_proj.fraction_of_copy_bw|batch1.eager_step.gate_up_proj.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "down_proj of copy bandwidth",
        "batch1.graphed.table.down_proj.fraction_of_copy_bw|batch1.eager_step.down_proj.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "lm_head of copy bandwidth",
        "batch1.graphed.table.lm_head.fraction_of_copy_bw|batch1.eager_step.lm_head.fraction_of_copy_bw",
        "",
        "",
    ),
    (
        "K1",
        "attention of copy bandwidth",
        "batch1.graphed.table.attention.fraction_of_copy_bw|batch1.eager_step.attention.fraction_of_copy_bw",
        "",
        "",
    ),
]


def _dig(d: Any, path: str) -> Any:
    """The value at a dotted path; 'a.b|c.d' takes the first alternative present."""
    if "|" in path:
        for alt in path.split("|"):
            found = _dig(d, alt)
            if found is not None:
                return found
        return None
    for key in path.split(".") if path else []:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d if path else None


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"
    return str(x)


def summary_table(directory: str | Path) -> str:
    reports: dict[str, dict[str, Any]] = {}
    for f in sorted(Path(directory).glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and "benchmark" in d:
            reports[d["benchmark"]] = d
    lines = []
    card = next((d.get("card") for d in reports.values() if d.get("card")), "?")
    commit = next((d.get("commit") for d in reports.values() if d.get("commit")), None)
    bw = next((d["copy_bandwidth"]["GB_s"] for d in reports.values() if d.get("copy_bandwidth")), None)
    lines.append(f"card: {card}   commit: {commit}   copy bandwidth: {_fmt(bw)} GB/s")
    header = f"{'id':<4} {'figure':<30} {'weir':>12} {'peer':>12} {'ratio':>8}  target"
    lines += [header, "-" * len(header)]
    for bench, label, ours_path, peer_path, target in _SUMMARY_ROWS:
        d = reports.get(bench)
        if d is None:
            continue
        ours = _dig(d.get("results"), ours_path)
        if peer_path.startswith("^"):
            peer = _dig(d, peer_path[1:])
        else:
            peer = _dig(d.get("peer"), peer_path) if peer_path else None
        r = None
        if isinstance(ours, int | float) and isinstance(peer, int | float) and peer:
            r = ours / peer
            if "ms" in label or label.startswith("s "):
                r = peer / ours if ours else None  # lower is better: show how many times faster
        lines.append(f"{bench:<4} {label:<30} {_fmt(ours):>12} {_fmt(peer):>12} {_fmt(r):>8}  {target}")
    for bench, d in reports.items():
        if d.get("status") != "ok" or d.get("errors"):
            lines.append(
                f"{bench}: status {d.get('status')}; errors: {'; '.join(d.get('errors') or []) or '-'}"
            )
    missing = [b for b in ("T1", "L1", "T2", "S1", "P1", "U1") if b not in reports]
    if missing:
        lines.append(f"no report: {', '.join(missing)}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 2:
        print(summary_table(sys.argv[1]))
    else:
        print(f"usage: python {sys.argv[0]} DIR")
        sys.exit(2)
