"""Q5's peer: weir's one-token W4A16 GEMV against GemLite's (a maintained Triton low-bit kernel library,
`pip install gemlite`; its GEMV "RevSplit-K" is what it runs for 4-bit weights at one token) on the same
codes, scales and zero points, at a model's four linear shapes, in one GPU call.

    python loadtest/peer_w4_gemv.py --shape llama3-8b --out peer_w4.json

Timing as Q5 and sweep_gemv.py (loadtest/gpu_timing.py): CUDA-graph replays cycling through enough
weight copies to miss L2; bytes read over the copy bandwidth measured in the same call. Each kernel is
checked against dequantize + matmul in float32 first. weir runs its planned
launch (what the engine runs: engine.model.quantization.wna16.plan_wna16_gemv; from 5 tokens, where the
engine runs the W4A16 GEMM, the same kernel in groups of 4 rows, each group decoding the tiles again), with
scales and zero points loaded in the word tiles' layout (`weir_meta2d`: no layout conversion in its loop,
ops/triton/w4_half2_gemv.py), with --max-registers under those register caps, the --variants
launches (a variant's `gated` stores silu(gate) * up, checked against that; `col_blocked` runs it on
`col_blocked_qweight`'s copy of the words, each program's split one contiguous run), the W4A16 GEMM where the planner has one for the batch (`weir_gemm`: what 5-16 tokens run) and
bf16 cuBLAS on bf16 weights of the shape (`bf16`, its own bytes). GemLite runs with its own tuned
configurations for the card where it ships them (configs/h100.json on an H100) and its "fast" autotuning
otherwise; its output is zeroed each call (a memset in the graph) since its GEMV adds its K splits with atomics.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.gpu_timing import kernel_timer  # noqa: E402
from loadtest.model_shapes import SHAPES  # noqa: E402

GROUP = 128
# launches beside the planned one (--variants): GemLite's shape of work, each program one or two tiles of
# K and its partial sums added by the split's tickets, so many more programs in flight and no loop
VARIANTS = [
    {"block_n": 64, "block_k": 128, "split_k": 32, "num_warps": 2, "ahead": 0},
    {"block_n": 128, "block_k": 128, "split_k": 32, "num_warps": 4, "ahead": 0},
    {"block_n": 256, "block_k": 128, "split_k": 32, "num_warps": 4, "ahead": 0},
    {"block_n": 64, "block_k": 64, "split_k": 64, "num_warps": 2, "ahead": 0},
    {"block_n": 128, "block_k": 64, "split_k": 32, "num_warps": 2, "ahead": 1},
    {"block_n": 64, "block_k": 128, "split_k": 16, "num_warps": 2, "ahead": 1, "x_ahead": True},
]


def _gemlite_layer(qweight: Any, scales: Any, zeros: Any, k: int, n: int) -> Any:
    """GemLite's 4-bit linear holding the same weights: codes [N, K] uint8, scales and zero points
    [N, K / group] in bf16 (its metadata takes the activations' dtype)."""
    import torch
    from gemlite.core import DType, GemLiteLinearTriton

    from engine.model.quantization.packing import unpack_rows

    codes = unpack_rows(qweight, 4).t().contiguous().to(torch.uint8)  # [N, K]
    layer = GemLiteLinearTriton(
        W_nbits=4, group_size=GROUP, in_features=k, out_features=n,
        input_dtype=DType.BF16, output_dtype=DType.BF16,
    )  # fmt: skip
    return layer.pack(codes, scales.t().contiguous().bfloat16(), zeros.t().contiguous().bfloat16())


def compare_shape(
    k: int, n: int, tokens: int, bandwidth: float, max_registers: list[int], sms: int, variants: list[dict]
) -> dict:
    import torch
    import torch.nn.functional as F

    from engine.model.quantization.wna16 import plan_wna16, plan_wna16_gemv, run_wna16_gemv
    from loadtest.gpu_timing import copies_past_l2 as copies_for
    from loadtest.sweep_gemv import _w4_copies
    from ops.triton.w4_half2_gemv import col_blocked_qweight, w4_half2_gemv
    from ops.triton.wna16_gemm import wna16_dequantize, wna16_gemm

    gen = torch.Generator(device="cuda").manual_seed(0)
    copies = _w4_copies(k, n, GROUP, gen)  # [(qweight [K/8, N], scales [G, N], zeros [G, N])]
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = x.float() @ wna16_dequantize(*copies[0], 4, GROUP, torch.float32)  # [M, N]
    nbytes = k * n // 2 + 2 * (k // GROUP) * n * 2
    row: dict[str, Any] = {"k": k, "n": n, "tokens": tokens, "bytes": nbytes}

    timed = kernel_timer(row, ref, nbytes, bandwidth, f"[peer_w4] {k}x{n} m={tokens}")

    dense = [
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(copies_for(k * n * 2))
    ]  # cuBLAS on bf16 weights of the shape, against its own product in float32 and its own bytes
    timed("bf16", [functools.partial(F.linear, x, w) for w in dense], F.linear(x, dense[0]),
          F.linear(x.float(), dense[0].float()), k * n * 2)  # fmt: skip
    del dense
    gemm = plan_wna16(tokens, k, n, GROUP, sms, gemv=False)
    if gemm.path == "gemm":  # the W4A16 GEMM (16-row tl.dot tiles) at this batch
        launch_args = (
            gemm.block_m,
            gemm.block_n,
            gemm.block_k,
            gemm.split_k,
            gemm.num_warps,
            gemm.num_stages,
        )
        timed("weir_gemm", [functools.partial(wna16_gemm, x, *q, 4, GROUP, *launch_args) for q in copies],
              wna16_gemm(x, *copies[0], 4, GROUP, *launch_args))  # fmt: skip
    plan = plan_wna16_gemv(tokens, k, n, GROUP, sms)
    row["weir_launch"] = repr(plan)
    timed("weir", [functools.partial(run_wna16_gemv, x, *q, 4, GROUP, plan) for q in copies],
          run_wna16_gemv(x, *copies[0], 4, GROUP, plan))  # fmt: skip
    launch = dict(block_n=plan.block_n, block_k=plan.block_k, split_k=plan.split_k, num_warps=plan.num_warps,
                  ahead=plan.ahead, x_ahead=plan.x_ahead)  # fmt: skip
    if plan.folded:  # the same launch with scales and zero points in the word tiles' layout (META_2D)
        fn = functools.partial(w4_half2_gemv, group_size=GROUP, meta_2d=True, **launch)
        timed("weir_meta2d", [functools.partial(fn, x, *q) for q in copies], fn(x, *copies[0]))
    for regs in max_registers:
        fn = functools.partial(w4_half2_gemv, group_size=GROUP, max_registers=regs, **launch)
        timed(f"weir_maxnreg{regs}", [functools.partial(fn, x, *q) for q in copies], fn(x, *copies[0]))
    gated_ref = F.silu(ref[:, : n // 2]) * ref[:, n // 2 :]  # [M, N / 2]: what a gated launch stores
    for cfg in variants:
        name = "weir_" + "_".join(f"{key}{int(value)}" for key, value in cfg.items())
        fn = functools.partial(w4_half2_gemv, group_size=GROUP, **cfg)
        try:
            weights = copies
            if cfg.get("col_blocked"):  # the same words, each program's split one contiguous run
                weights = [
                    (col_blocked_qweight(q[0], cfg["block_n"], cfg.get("gated", False)), *q[1:])
                    for q in copies
                ]
            expected = gated_ref if cfg.get("gated") else ref
            timed(name, [functools.partial(fn, x, *q) for q in weights], fn(x, *weights[0]), expected)
            del weights
        except Exception as e:  # noqa: BLE001 (a launch the shape cannot take: reported, the rest go on)
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    try:
        layers = [_gemlite_layer(*q, k, n) for q in copies]
        timed("gemlite", [functools.partial(layer.forward, x) for layer in layers], layers[0].forward(x))
    except Exception as e:  # noqa: BLE001 (the peer failing is a result, not the end of the call)
        row["gemlite"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"[peer_w4] gemlite failed: {row['gemlite']['error']}", flush=True)
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--batches", default="1", help="token counts (1-4: the GEMV's range)")
    p.add_argument("--max-registers", default="96,80", help="register caps for weir's launch ('' for none)")
    p.add_argument("--variants", default=json.dumps(VARIANTS), help="JSON list of w4_half2_gemv launches")
    p.add_argument("--out", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from loadtest.common import measure_copy_bandwidth
    from loadtest.probe_fp8_gemm import linear_shapes

    shapes = linear_shapes(args.shape)
    bandwidth = measure_copy_bandwidth("cuda")["bytes_per_s"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    regs = [int(r) for r in args.max_registers.split(",") if r]
    try:
        import gemlite

        peer_version = getattr(gemlite, "__version__", "?")
    except ImportError as e:
        peer_version = f"not importable: {e}"
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "copy_bandwidth_gbs": round(bandwidth / 1e9),
                              "shape": args.shape, "gemlite": peer_version}  # fmt: skip
    for tokens in (int(b) for b in args.batches.split(",")):
        for name, (k, n) in shapes.items():
            report[f"{name}_m{tokens}"] = compare_shape(
                k, n, tokens, bandwidth, regs, sms, json.loads(args.variants)
            )
            if args.out:  # after every shape: a call that runs out of time keeps what it measured
                Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
