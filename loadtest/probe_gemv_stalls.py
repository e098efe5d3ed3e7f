"""Where the one-token decode GEMVs wait: CUPTI PC sampling (Triton's proton profiler) of weir's W4A16 GEMV
(the planned launch, ops/triton/w4_half2_gemv.py) beside the FP8 GEMV (ops/triton/fp8_gemv.py) at a model's
linear shapes (and, with the kind `attn`, the prefill attention of T2's 8 x 1,024-token steps), each sample attributed to a kernel source line with the warp's stall reason.

    python loadtest/probe_gemv_stalls.py --shape llama3-8b --out-dir /tmp/o/stalls

The W4A16 GEMV reads its weights at 0.40-0.755 of the copy bandwidth on an H100 where the FP8 GEMV reaches
0.70-0.96 (issue 12's Q5); by the instruction count it issues well under the SMs' rate, so the question is
what its warps wait on (memory round trips, the dependent FMA chain, barriers, too few warps). Each kernel
runs REPS times cycling through weight copies that miss L2, as the timings do (loadtest/gpu_timing.py),
in a proton scope of its own inside one session for the whole run (stalls.hatchet); the summary: per kernel, the samples by stall reason and the source lines with the most samples, each with its
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


def _leaves(node: dict, path: list[str], out: list[dict]) -> None:
    """The leaves of a hatchet tree (nodes without children: source locations) as (path, metrics)."""
    here = [*path, str(node.get("frame", {}).get("name", "?"))]
    children = node.get("children") or []
    if not children:
        out.append({"path": here, "metrics": node.get("metrics", {})})
    for child in children:
        _leaves(child, here, out)


def summarize(tree: Any, top: int = 25) -> dict:
    """Samples by stall reason over the tree's leaves, and the `top` leaves by samples. A leaf is a source
    location (or a kernel, where the profile has no line for it); its numeric metrics named with "stall",
    other than the count of stalled samples, are reasons, `num_samples` its count. `stalls`: each reason's
    share of all the reasons' samples; `stalled`: the stalled samples' share of all (proton's metric names
    are kept in `metric_names` to check that reading)."""
    leaves: list[dict] = []
    for root in tree if isinstance(tree, list) else [tree]:
        _leaves(root, [], leaves)
    reasons: dict[str, float] = defaultdict(float)
    lines = []
    total_samples = total_stalled = 0.0
    for leaf in leaves:
        m = {k: float(v) for k, v in leaf["metrics"].items() if isinstance(v, int | float)}
        stalls = {k: v for k, v in m.items() if "stall" in k.lower() and not k.startswith("num_")}
        for k, v in stalls.items():
            reasons[k] += v
        samples = m.get("num_samples", 0.0)
        total_samples += samples
        total_stalled += m.get("num_stalled_samples", 0.0)
        best = sorted(stalls.items(), key=lambda kv: -kv[1])[:4]
        lines.append({"where": " / ".join(leaf["path"][-3:]), "samples": samples, "top_stalls": best})
    lines.sort(key=lambda r: -r["samples"])
    total = sum(reasons.values()) or 1.0
    return {
        "metric_names": sorted({k for leaf in leaves for k in leaf["metrics"]}),
        "stalls": {k: round(v / total, 4) for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])},
        "stalled": round(total_stalled / total_samples, 4) if total_samples else None,
        "top_lines": lines[:top],
        "leaves": len(leaves),
    }


def find_scope(tree: Any, name: str) -> dict | None:
    """The first node (depth first) of a hatchet tree whose frame is `name`: a proton scope's subtree."""
    for node in tree if isinstance(tree, list) else [tree]:
        if node.get("frame", {}).get("name") == name:
            return node
        found = find_scope(node.get("children") or [], name)
        if found is not None:
            return found
    return None


def kernel_calls(kind: str, shape: str, layer: str) -> tuple[list[Any], dict[str, Any]]:
    """The calls to profile for one case, cycling through operand copies that miss L2, and what they run.
    kind w4 / fp8: the one-token GEMV at the shape's `layer` (its planned launch); attn: paged attention on
    T2's prefill step (8 fresh 1,024-token prompts, the shape's heads; `layer` unused), its default launch."""
    import torch

    if kind == "attn":
        import ops.triton as tops
        from loadtest.kernel_check_common import make_paged

        cfg = SHAPES[shape]
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)
        batch = make_paged([1024] * 8, [1024] * 8, heads, kv_heads, head_dim, 16, seed=11)
        return [functools.partial(tops.paged_attention, **batch)], {"heads": heads, "kv_heads": kv_heads}
    from engine.model.quantization.fp8 import fp8_gemv_launch
    from engine.model.quantization.wna16 import plan_wna16_gemv, run_wna16_gemv
    from loadtest.probe_fp8_gemm import linear_shapes
    from loadtest.sweep_gemv import _fp8_copies, _w4_copies
    from ops.triton.fp8_gemv import fp8_gemv

    k, n = linear_shapes(shape)[layer]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if kind == "w4":
        plan = plan_wna16_gemv(1, k, n, GROUP, sms)
        fns = [functools.partial(run_wna16_gemv, x, *q, 4, GROUP, plan) for q in _w4_copies(k, n, GROUP, gen)]
        return fns, {"k": k, "n": n, "launch": repr(plan)}
    cfg = fp8_gemv_launch(k, n, sms, 1)
    fns = [functools.partial(fp8_gemv, x, w, s, None, **cfg) for w, s in _fp8_copies(k, n, gen)]
    return fns, {"k": k, "n": n, "launch": repr(cfg)}


def profile(name: str, fns: list[Any], reps: int) -> None:
    """Inside the running session: `fns` compiled and warmed (scope NAME_warmup), then `reps` calls of them
    in turn (scope NAME)."""
    import torch
    import triton.profiler as proton

    with proton.scope(f"{name}_warmup"):
        for fn in fns:
            fn()
        torch.cuda.synchronize()
    with proton.scope(name):
        for i in range(reps):
            fns[i % len(fns)]()
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", default="qkv,gate_up,down", help="of qkv, o, gate_up, down")
    p.add_argument("--kinds", default="w4,fp8", help="of w4, fp8, attn (prefill attention, 8 x 1,024 tokens)")
    p.add_argument("--reps", type=int, default=400)
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = args.layers.split(",")
    cases = [
        (kind, layer)
        for kind in args.kinds.split(",")
        for layer in (["prefill8x1024"] if kind == "attn" else layers)
    ]
    # One session for every case, started before any kernel is compiled: an H100 run at 1396ef1 that
    # compiled each kernel before its own session got whole kernels only, no source lines. The likely cause
    # (not yet checked on a GPU): the profiler maps PCs to lines from each cubin as its module loads.
    import triton.profiler as proton

    path = str(out_dir / "stalls")
    _start(path)
    rows = []
    for kind, layer in cases:
        row: dict[str, Any] = {"kind": kind, "layer": layer, "reps": args.reps}
        try:
            fns, what = kernel_calls(kind, args.shape, layer)
            profile(f"{kind}_{layer}", fns, args.reps)
            row |= what
        except Exception as e:  # noqa: BLE001 (a profiler that cannot sample is the result)
            row |= {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        rows.append(row)
    proton.finalize()
    hatchet = Path(path + ".hatchet")
    tree = json.loads(hatchet.read_text()) if hatchet.exists() else None
    for row in rows:
        name = f"{row['kind']}_{row['layer']}"
        scope = find_scope(tree, name) if tree is not None and "error" not in row else None
        if scope is not None:
            row["summary"] = summarize(scope)
        elif "error" not in row:
            row["error"] = (
                f"no scope {name} in {hatchet.name}; files: {sorted(p.name for p in out_dir.iterdir())}"
            )
        print(json.dumps(row, indent=1)[:6000], flush=True)
    (out_dir / "stalls.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
