"""Q1-Q5: what quantization buys on a GPU, each figure against bf16 in the same call (issue 12).

    python loadtest/bench_quant.py --shape llama3-8b --out q.json            # all of Q1..Q5
    python loadtest/bench_quant.py --cases Q5 --out q5.json                  # one of them

Random weights at the real shape (load_format dummy; GPTQ/AWQ from a copy of the shape's config.json
with a quantization_config, FP8 weights quantized at load with --quantization fp8):
- Q1: L1's batch-1 ITL (32 prompt / 128 output tokens, bench_latency's loop) with GPTQ and AWQ 4-bit
  group-128 weights (the Triton W4A16 kernels), as a fraction of bf16's; target <= 0.40. `--l1-batch 8`
  times Q1 and Q2 at L1's batch 8 instead (no target; the ratio keys stay the same).
- Q2: the same with FP8 weights (torch._scaled_mm, W8A8 dynamic); target <= 0.60.
- Q3: T2's offline throughput (1024 prompt / 128 output tokens, --t2-requests) with FP8 weights vs bf16;
  target >= 1.5.
- Q4: FP8 KV cache (--kv-cache-dtype fp8): KV blocks (target 2x) and T2 throughput (target >= 1.0x)
  against the bf16 cache.
- Q3KV (not in the default set): Q3 with the FP8 KV cache too (FP8 weights shorten the GEMMs, the fp8
  cache the decode steps' attention), reported as Q3_fp8_weights_kv_throughput_vs_bf16.
- Q5: the W4A16 kernels alone at the shape's four linear layers: batch 1..16 as a fraction of the copy
  bandwidth (bytes of packed weights, scales, zeros, x and y over the kernel time; target >= 0.80 at
  batch 1): at 1-2 tokens the GEMV the engine runs (`engine_gemv`, engine.model.quantization.wna16.
  run_wna16_gemv), at 3-255 the skinny W4A16 GEMM it runs (`engine_skinny`, ops/triton/w4_skinny_gemm.py), and
  at every batch the GEMM, both ways of unpacking (reshape, the default, and
  gather_words); from 256 tokens the
  dequantize + cuBLAS path's TFLOP/s against the bf16 GEMM's. Timed as CUDA-graph replays cycling
  through weight copies larger than L2 (loadtest/gpu_timing.py), for both sides.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.bench_latency import measure_engine  # noqa: E402
from loadtest.common import (  # noqa: E402
    Report,
    add_common_args,
    build_llm,
    copy_bandwidth_phase,
    engine_info,
    engine_kwargs,
    engine_runner,
    free_engine,
    install_signal_handlers,
    phase,
    random_workload,
    resolve_model,
)
from loadtest.gpu_timing import copies_past_l2, graph_ms  # noqa: E402

CASES = ("Q1", "Q2", "Q3", "Q4", "Q5")
EXTRA_CASES = ("Q3KV",)
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
Q1_FORMATS = {"gptq": GPTQ, "awq": AWQ}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated of " + ", ".join(CASES + EXTRA_CASES)
    )
    p.add_argument("--input-len", type=int, default=32, help="Q1/Q2 prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="Q1/Q2 output tokens")
    p.add_argument(
        "--l1-batch", type=int, default=1, help="Q1/Q2 sequences decoding together (the targets are at 1)"
    )
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--t2-requests", type=int, default=1000, help="Q3/Q4 requests (T2's workload)")
    p.add_argument("--group-size", type=int, default=128, help="Q1's GPTQ/AWQ group size (64 or 128)")
    p.add_argument(
        "--q1-methods", default="gptq,awq", help="Q1's checkpoint formats, comma-separated of gptq, awq"
    )
    add_common_args(p, default_shape="llama3-8b")
    return p


def quantized_copy(model_dir: str, root: Path, name: str, quant: dict[str, Any]) -> str:
    """The shape's folder with a quantization_config in its config.json (weights stay dummy)."""
    dst = root / name
    shutil.copytree(model_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def latency(model_dir: str, kwargs: dict[str, Any], args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    llm, build_s = build_llm(_Model(model_dir), kwargs)
    try:
        res = measure_engine(llm.llm_engine, args, args.l1_batch, min(10000, vocab))
        res["engine_build_s"] = round(build_s, 2)
        res["engine"] = engine_info(llm)
        return res
    finally:
        free_engine(llm)


def throughput(
    model_dir: str, kwargs: dict[str, Any], args: argparse.Namespace, vocab: int
) -> dict[str, Any]:
    from engine import SamplingParams

    work = random_workload(args.t2_requests, (1024, 1024), (128, 128), args.seed, min(10000, vocab))
    llm, _ = build_llm(_Model(model_dir), kwargs)
    try:
        params = SamplingParams(temperature=args.temperature, max_tokens=128, ignore_eos=True, seed=args.seed)
        llm.generate(work.prompts[:16], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(work.prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        runner = engine_runner(llm)
        return {
            "output_tok_s": round(tokens / elapsed, 1),
            "elapsed_s": round(elapsed, 2),
            "output_tokens": tokens,
            "num_kv_blocks": llm.llm_engine.num_kv_blocks,
            # what ran: the cache's dtype as allocated, the weights' method, the fp8 cache's read path
            "kv_cache_dtype": str(runner.kv_caches[0][0].dtype).removeprefix("torch.") if runner else None,
            "quantization": kwargs.get("quantization"),
            "fp8_kv_widen": os.environ.get("WEIR_FP8_KV_WIDEN", "0") == "1",
        }
    finally:
        free_engine(llm)


class _Model:
    """build_llm's model argument: only its directory is read."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir


def kernel_bench(config: dict[str, Any], bandwidth: float) -> dict[str, Any]:
    """Q5 at the model's four linear shapes (fused as weir runs them): the GEMV the engine runs at 1-2
    tokens (`engine_gemv`), the skinny W4A16 GEMM it runs at 3-255 (`engine_skinny`), the dot kernel (GEMM) at the
    plan's tiles, bf16's matmul."""
    import torch

    from engine.model.quantization.wna16 import plan_w4_skinny, plan_wna16, run_wna16_gemv
    from ops.triton.w4_skinny_gemm import w4_skinny_gemm
    from ops.triton.wna16_gemm import wna16_dequantize, wna16_gemm

    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes = {"qkv": (h, h + 2 * kv), "o": (h, h), "gate_up": (h, 2 * inter), "down": (inter, h)}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    out: dict[str, Any] = {}
    for name, (k, n) in shapes.items():
        group = 128
        # distinct weight copies, cycled through by the timed graph, so no call finds its weight in L2
        q_copies = copies_past_l2(k * n // 2)
        quantized = [
            (
                torch.randint(
                    -(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda", generator=gen
                ),
                (torch.rand(k // group, n, device="cuda", generator=gen) * 1e-3).half(),
                torch.full((k // group, n), 8.0, device="cuda").half(),
            )
            for _ in range(q_copies)
        ]  # [(qweight [K/8, N] int32, scales [G, N], zeros [G, N])]
        dense = [
            torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(copies_past_l2(k * n * 2))
        ]  # [K, N] bf16 each
        rows: dict[str, Any] = {"weight_copies": {"w4a16": q_copies, "bf16": len(dense)}}
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            plan = plan_wna16(m, k, n, group, sms)
            moved = k * n // 2 + 2 * (k // group) * n * 2 + (m * k + m * n) * 2  # bytes read + written
            row: dict[str, Any] = {"plan": [plan.block_m, plan.block_n, plan.block_k, plan.split_k]}
            skinny = plan_w4_skinny(m, k, n, group, sms)
            if skinny is not None:  # what the engine runs at 3-255 tokens: the tensor-core skinny W4A16 GEMM
                launch = dict(block_n=skinny.block_n, block_k=skinny.block_k, split_k=skinny.split_k,
                              num_warps=skinny.num_warps, num_stages=skinny.num_stages, scaled=skinny.scaled,
                              block_m=skinny.block_m)  # fmt: skip
                ms = graph_ms([functools.partial(w4_skinny_gemm, x, *q, group, **launch) for q in quantized])
                row["engine_skinny"] = {
                    "us": round(ms * 1000, 2),
                    "bandwidth_fraction": round(moved / (ms / 1000) / bandwidth, 3),
                }
            elif plan.path == "gemv":  # what the engine runs at this batch (1-2 tokens): the GEMV
                ms = graph_ms([functools.partial(run_wna16_gemv, x, *q, 4, group, plan) for q in quantized])
                row["engine_gemv"] = {
                    "us": round(ms * 1000, 2),
                    "bandwidth_fraction": round(moved / (ms / 1000) / bandwidth, 3),
                    "folded": plan.folded,
                }
            for label, gather in (("reshape", False), ("gather_words", True)):
                calls = [
                    functools.partial(
                        wna16_gemm,
                        x,
                        qweight,
                        scales,
                        zeros,
                        4,
                        group,
                        plan.block_m,
                        plan.block_n,
                        plan.block_k,
                        plan.split_k,
                        plan.num_warps,
                        plan.num_stages,
                        gather,
                    )  # fmt: skip
                    for qweight, scales, zeros in quantized
                ]
                ms = graph_ms(calls)
                row[label] = {
                    "us": round(ms * 1000, 2),
                    "bandwidth_fraction": round(moved / (ms / 1000) / bandwidth, 3),
                }
            bf16_ms = graph_ms([functools.partial(torch.matmul, x, w) for w in dense])
            row["bf16_us"] = round(bf16_ms * 1000, 2)
            row["bf16_bandwidth_fraction"] = round(
                (k * n * 2 + (m * k + m * n) * 2) / (bf16_ms / 1000) / bandwidth, 3
            )
            rows[f"m{m}"] = row
        for m in (256, 1024, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            flops = 2 * m * k * n
            dequant = [
                functools.partial(wna16_dequantize, qweight, scales, zeros, 4, group, torch.bfloat16)
                for qweight, scales, zeros in quantized
            ]
            q_ms = graph_ms([lambda x=x, d=d: torch.matmul(x, d()) for d in dequant], calls=len(dequant))
            b_ms = graph_ms([functools.partial(torch.matmul, x, w) for w in dense], calls=len(dense))
            rows[f"m{m}"] = {
                "w4a16_tflops": round(flops / (q_ms / 1000) / 1e12, 1),
                "bf16_tflops": round(flops / (b_ms / 1000) / 1e12, 1),
                "ratio": round(b_ms / q_ms, 3),
            }
        del quantized, dense
        out[name] = {"k": k, "n": n, "group_size": group, **rows}
        print(f"[Q5] {name} {k}x{n}: {json.dumps(rows['m1'])}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cases = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES + EXTRA_CASES))
    if unknown:
        build_parser().error(
            f"--cases: unknown {', '.join(unknown)}; known: {', '.join(CASES + EXTRA_CASES)}"
        )
    model = resolve_model(args)
    vocab = model.vocab_size
    report = Report("Q", args, model)
    install_signal_handlers()
    report["workload"] = {
        "cases": cases,
        "l1": [args.input_len, args.output_len],
        "l1_batch": args.l1_batch,
        "t2_requests": args.t2_requests,
    }
    bw = copy_bandwidth_phase(report, model.device, args.copy_bytes)
    results = report["results"]
    ratios = report["ratios"]
    l1_kwargs = engine_kwargs(args, model, max_model_len=256)
    t2_kwargs = engine_kwargs(args, model, max_model_len=1280)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if {"Q1", "Q2"} & set(cases):
            variants = {"bf16": (model.model_dir, {})}
            if "Q1" in cases:
                group = {"group_size": args.group_size}
                for method in [m.strip() for m in args.q1_methods.split(",") if m.strip()]:
                    if method not in Q1_FORMATS:
                        build_parser().error(f"--q1-methods: unknown {method!r}; known: gptq, awq")
                    quant = {**Q1_FORMATS[method], **group}
                    variants[f"{method}_w4a16"] = (quantized_copy(model.model_dir, root, method, quant), {})
            if "Q2" in cases:
                variants["fp8"] = (model.model_dir, {"quantization": "fp8"})
            for label, (model_dir, extra) in variants.items():
                with phase(report, f"l1_{label}", required=False):
                    results[f"l1_{label}"] = latency(model_dir, {**l1_kwargs, **extra}, args, vocab)
                    print(f"[L1 {label}] ITL p50 {results[f'l1_{label}']['itl_p50_ms']:.3f} ms", flush=True)
                    report.save()
            base = (results.get("l1_bf16") or {}).get("itl_p50_ms")
            for label in variants:
                got = (results.get(f"l1_{label}") or {}).get("itl_p50_ms")
                if base and got and label != "bf16":
                    ratios[f"Q{'2' if label == 'fp8' else '1'}_{label}_itl_vs_bf16"] = round(got / base, 3)
        if {"Q3", "Q4", "Q3KV"} & set(cases):
            variants = {"bf16": {}}
            if "Q3" in cases:
                variants["fp8_weights"] = {"quantization": "fp8"}
            if "Q4" in cases:
                variants["fp8_kv"] = {"kv_cache_dtype": "fp8"}
            if "Q3KV" in cases:
                variants["fp8_weights_kv"] = {"quantization": "fp8", "kv_cache_dtype": "fp8"}
            for label, extra in variants.items():
                with phase(report, f"t2_{label}", required=False):
                    results[f"t2_{label}"] = throughput(model.model_dir, {**t2_kwargs, **extra}, args, vocab)
                    print(f"[T2 {label}] {json.dumps(results[f't2_{label}'])}", flush=True)
                    report.save()
            base = results.get("t2_bf16") or {}
            for label, key in (("fp8_weights", "Q3"), ("fp8_kv", "Q4"), ("fp8_weights_kv", "Q3")):
                got = results.get(f"t2_{label}") or {}
                if base.get("output_tok_s") and got.get("output_tok_s"):
                    ratios[f"{key}_{label}_throughput_vs_bf16"] = round(
                        got["output_tok_s"] / base["output_tok_s"], 3
                    )
                if label == "fp8_kv" and base.get("num_kv_blocks") and got.get("num_kv_blocks"):
                    ratios["Q4_kv_blocks_vs_bf16"] = round(got["num_kv_blocks"] / base["num_kv_blocks"], 3)
    if "Q5" in cases and bw and model.device == "cuda":
        with phase(report, "q5_kernels", required=False):
            results["q5_w4a16_kernel"] = kernel_bench(model.config, bw["bytes_per_s"])
            m1 = [
                results["q5_w4a16_kernel"][s]["m1"]["reshape"]["bandwidth_fraction"]
                for s in ("qkv", "o", "gate_up", "down")
            ]
            ratios["Q5_batch1_bandwidth_fraction_min"] = min(m1)
    results["vs_bf16"] = dict(ratios)  # the suite's summary table reads results
    report.note("targets: Q1 <= 0.40, Q2 <= 0.60, Q3 >= 1.5, Q4 blocks 2x and throughput >= 1.0, Q5 >= 0.80")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
