"""Where the one-token decode GEMVs wait: CUPTI PC sampling (Triton's proton profiler) of weir's W4A16 GEMV
(the planned launch, ops/triton/w4_half2_gemv.py) beside the FP8 GEMV (ops/triton/fp8_gemv.py) at a model's
linear shapes (and, with the kind `attn`, the prefill attention of T2's 8 x 1,024-token steps), each sample attributed to a kernel source line with the warp's stall reason.

    python loadtest/probe_gemv_stalls.py --shape llama3-8b --out-dir /tmp/o/stalls

The W4A16 GEMV reads its weights at 0.40-0.755 of the copy bandwidth on an H100 where the FP8 GEMV reaches
0.70-0.96 (issue 12's Q5); by the instruction count it issues well under the SMs' rate, so the question is
what its warps wait on (memory round trips, the dependent FMA chain, barriers, too few warps). Each kernel
runs REPS times cycling through weight copies that miss L2, as the timings do (loadtest/gpu_timing.py),
inside one proton session per (kernel, layer); the profile's tree (hatchet JSON) is written beside a
summary: per kernel, the samples by stall reason and the source lines with the most samples, each with its
top reasons. Needs a CUDA GPU and a profiling-permitted driver (CUPTI); a failure is written as the result.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.model_shapes import SHAPES  # noqa: E402

GROUP = 128


def _start(name: str) -> Any:
    """A PC-sampling proton session (the API moved: `mode=` on newer Triton, a backend name on older)."""
    import triton.profiler as proton

    try:
        return proton.start(name, backend="cupti", mode="pcsampling", context="shadow")
    except TypeError:
        return proton.start(name, backend="cupti_pcsampling", context="shadow")


def _walk(node: dict, path: list[str], rows: list[dict]) -> None:
    """Every node of a hatchet tree as (path, metrics)."""
    name = str(node.get("frame", {}).get("name", "?"))
    here = [*path, name]
    rows.append({"path": here, "metrics": node.get("metrics", {})})
    for child in node.get("children", []) or []:
        _walk(child, here, rows)


def summarize(tree: Any, top: int = 25) -> dict:
    """Samples by stall reason over the whole tree's leaves, and the `top` leaves by samples. A leaf is a
    source location; metric names holding "stall" (or "reason") are reasons, "num_samples" the count."""
    roots = tree if isinstance(tree, list) else [tree]
    rows: list[dict] = []
    for root in roots:
        _walk(root, [], rows)
    leaves = [
        r for r in rows if not any(r is not s and s["path"][: len(r["path"])] == r["path"] for s in rows)
    ]
    reasons: dict[str, float] = defaultdict(float)
    lines = []
    for leaf in leaves:
        m = leaf["metrics"]
        stalls = {k: float(v) for k, v in m.items() if isinstance(v, int | float) and ("stall" in k.lower())}
        for k, v in stalls.items():
            reasons[k] += v
        samples = next(
            (float(v) for k, v in m.items() if "sample" in k.lower() and isinstance(v, int | float)), 0.0
        )
        best = sorted(stalls.items(), key=lambda kv: -kv[1])[:4]
        lines.append({"where": " / ".join(leaf["path"][-3:]), "samples": samples, "top_stalls": best})
    lines.sort(key=lambda r: -r["samples"])
    total = sum(reasons.values()) or 1.0
    return {
        "metric_names": sorted({k for r in rows for k in r["metrics"]}),
        "stalls": {k: round(v / total, 4) for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])},
        "top_lines": lines[:top],
        "leaves": len(leaves),
    }


def probe(kind: str, layer: str, k: int, n: int, reps: int, out_dir: Path) -> dict:
    import torch
    import triton.profiler as proton

    from engine.model.quantization.fp8 import fp8_gemv_launch
    from engine.model.quantization.wna16 import plan_wna16_gemv, run_wna16_gemv
    from loadtest.sweep_gemv import _fp8_copies, _w4_copies
    from ops.triton.fp8_gemv import fp8_gemv

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if (
        kind == "attn"
    ):  # paged attention on T2's prefill step (8 fresh 1,024-token prompts), its default launch
        import ops.triton as tops
        from loadtest.kernel_check_common import make_paged

        batch = make_paged([1024] * 8, [1024] * 8, n, k, 128, 16, seed=11)  # n query heads, k KV heads
        fns = [functools.partial(tops.paged_attention, **batch)]
        launch = "default"
    elif kind == "w4":
        plan = plan_wna16_gemv(1, k, n, GROUP, sms)
        fns = [functools.partial(run_wna16_gemv, x, *q, 4, GROUP, plan) for q in _w4_copies(k, n, GROUP, gen)]
        launch = repr(plan)
    else:
        cfg = fp8_gemv_launch(k, n, sms, 1)
        fns = [functools.partial(fp8_gemv, x, w, s, None, **cfg) for w, s in _fp8_copies(k, n, gen)]
        launch = repr(cfg)
    for fn in fns:  # compile and warm outside the session
        fn()
    torch.cuda.synchronize()
    name = str(out_dir / f"{kind}_{layer}")
    _start(name)
    with proton.scope(f"{kind}_{layer}"):
        for i in range(reps):
            fns[i % len(fns)]()
    torch.cuda.synchronize()
    proton.finalize()
    hatchet = Path(name + ".hatchet")
    row: dict[str, Any] = {"kind": kind, "layer": layer, "k": k, "n": n, "launch": launch, "reps": reps}
    if hatchet.exists():
        row["summary"] = summarize(json.loads(hatchet.read_text()))
    else:
        row["error"] = f"no {hatchet.name}; files: {sorted(p.name for p in out_dir.iterdir())}"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", default="qkv,gate_up,down", help="of qkv, o, gate_up, down")
    p.add_argument("--kinds", default="w4,fp8", help="of w4, fp8, attn (prefill attention, 8 x 1,024 tokens)")
    p.add_argument("--reps", type=int, default=400)
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    from loadtest.probe_fp8_gemm import linear_shapes

    shapes = linear_shapes(args.shape)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.kinds.split(","):
        for layer in args.layers.split(","):
            k, n = shapes[layer]
            if kind == "attn":  # one case: the shape's heads (k: KV heads, n: query heads)
                if layer != args.layers.split(",")[0]:
                    continue
                cfg = SHAPES[args.shape]
                layer, k, n = "prefill8x1024", cfg["num_key_value_heads"], cfg["num_attention_heads"]
            try:
                row = probe(kind, layer, k, n, args.reps, out_dir)
            except Exception as e:  # noqa: BLE001 (a profiler that cannot sample is the result)
                row = {
                    "kind": kind,
                    "layer": layer,
                    "error": f"{type(e).__name__}: {e}",
                    "tb": traceback.format_exc(),
                }
            rows.append(row)
            print(json.dumps(row, indent=1)[:6000], flush=True)
    (out_dir / "stalls.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
