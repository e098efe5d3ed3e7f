"""Launch sweep of the segment LoRA kernels (ops/triton/lora_segments.py) at Llama-3-8B's four LoRA layers
(rank 16), on A1's and A2's decode steps, in one short GPU call (issue 13):

    python loadtest/sweep_lora_segments.py --out sweep_lora_segments.json

Steps: 256 decode tokens on 64 adapters (4 tokens each, A2) and on 8 adapters (32 each, A1), ordered by
adapter as the scheduler orders them, with as many slots as adapters (max_loras, as bench_lora.py runs
A1 and A2; the wrappers' launch rule reads it). Per layer and step, the shrink over `total_programs` x
`programs` and the expand over `block_n` x `programs` x `num_warps`, each checked against the torch
reference first (a wrong variant is reported and never wins), then timed as CUDA-graph replays
(loadtest/gpu_timing.py). Today's launch (the wrappers' defaults: ops.triton.lora_segments.segment_launch
for the step) is marked `is_today`, the one launch every step took before that rule (BEFORE) `is_before`;
the best per layer and step is printed beside them. A decode step's LoRA cost is 32 x the sum over the
four layers. verify-h200-2026-12-03-8ed5bc2 ran before the rule, on 64 slots for both steps: its `today`
is BEFORE.

`--smoke` runs the same code on tiny layers under TRITON_INTERPRET=1 on CPU (CI): every variant is
checked; its "times" are interpreter wall times, meaningless except to exercise the selection.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.gpu_timing import rel_err, variant_us  # noqa: E402

RANK, TOKENS = 16, 256
LAYERS = (  # (name, in, sub-matrices' outputs)
    ("qkv", 4096, (4096, 1024, 1024)),
    ("o", 4096, (4096,)),
    ("gate_up", 4096, (14336, 14336)),
    ("down", 14336, (4096,)),
)
STEPS = (("64_adapters", 64), ("8_adapters", 8))  # (name, adapters over the step's tokens = slots)
SHRINK_GRID = {"total_programs": (256, 512, 1024), "programs": (32, 64, 128)}
EXPAND_GRID = {"block_n": (64, 128, 256), "programs": (16, 32, 64), "num_warps": (4, 8)}
BEFORE = {  # the wrappers' launch for every step before segment_launch
    "shrink": {"total_programs": 512, "programs": 64},
    "expand": {"block_n": 128, "programs": 64, "num_warps": 4},
}
SMOKE = {
    "layers": (("qkv", 64, (32, 16, 16)), ("down", 160, (48,))),
    "tokens": 24,
    "steps": (("6_adapters", 6),),
    # segment_launch's FEW_SEGMENTS (24 tokens on 6 slots: 7 segments at most) and a smaller launch
    "shrink": {"total_programs": (8, 1024), "programs": (4, 32)},
    "expand": {"block_n": (32, 256), "programs": (4, 16), "num_warps": (4,)},
}


def grid(axes: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def todays_launch(tokens: int, piece: int, slots: int) -> dict[str, dict[str, int]]:
    """The wrappers' default launch for a step (ops.triton.lora_segments.segment_launch), as sweep arguments."""
    from ops.triton.lora_segments import segment_launch

    launch = segment_launch(tokens, piece, slots)
    return {
        "shrink": {"total_programs": launch.total_programs, "programs": launch.shrink_programs},
        "expand": {
            "block_n": launch.block_n,
            "programs": launch.expand_programs,
            "num_warps": launch.expand_warps,
        },
    }


def sweep(layer: tuple[str, int, tuple[int, ...]], step: tuple[str, int], smoke: bool) -> dict[str, Any]:
    """One layer on one step: every shrink and expand variant checked, then timed."""
    import numpy as np
    import torch

    from engine.lora.segments import build_segments, segment_piece
    from ops import reference
    from ops.triton.lora_segments import lora_expand_segments, lora_shrink_segments

    name, k, sizes = layer
    step_name, adapters = step
    tokens, slots = (SMOKE["tokens"] if smoke else TOKENS), adapters
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    n, dim = sum(sizes), RANK * len(sizes) if not smoke else 4 * len(sizes)
    offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
    g = torch.Generator(device=device).manual_seed(0)
    a = (torch.randn(slots, dim, k, device=device, generator=g) * 0.02).to(dtype)  # [slots, S*R, K]
    b = torch.zeros(slots, n, dim, device=device, dtype=dtype)  # block-diagonal, as the slots hold it
    width = dim // len(sizes)
    for i, (start, rows) in enumerate(zip(offsets, sizes, strict=True)):
        block = torch.randn(slots, rows, width, device=device, generator=g) * 0.1
        b[:, start : start + rows, i * width : (i + 1) * width] = block.to(dtype)
    x = torch.randn(tokens, k, device=device, generator=g).to(dtype)  # [T, K]
    y0 = torch.randn(tokens, n, device=device, generator=g).to(dtype)  # [T, N]: the base output
    per = tokens // adapters
    host_slots = np.repeat(np.arange(adapters, dtype=np.int32), per)  # ordered by adapter
    host_slots = np.concatenate([host_slots, np.full(tokens - len(host_slots), -1, dtype=np.int32)])
    token_slots = torch.from_numpy(host_slots).to(device)
    piece = segment_piece(tokens)
    segments = torch.from_numpy(build_segments(host_slots, piece)).to(device)
    t_ref = reference.lora_shrink(x, a, token_slots)
    y_ref = reference.lora_expand(t_ref, b, token_slots, y0.clone(), offsets)
    rows = token_slots >= 0
    t = lora_shrink_segments(x, a, segments, piece)  # the expand variants' input
    result: dict[str, Any] = {
        "layer": name, "k": k, "n": n, "step": step_name, "slots": slots, "segments": int(segments[0]),
    }  # fmt: skip
    todays = todays_launch(tokens, piece, slots)
    for kind, axes in (
        ("shrink", SMOKE["shrink"] if smoke else SHRINK_GRID),
        ("expand", SMOKE["expand"] if smoke else EXPAND_GRID),
    ):
        today = todays[kind]
        rows_out = []
        for launch in grid(axes):
            if kind == "shrink":

                def fn(launch: dict[str, Any] = launch) -> Any:
                    return lora_shrink_segments(x, a, segments, piece, **launch)

                err = rel_err(fn().sum(0)[rows], t_ref[rows])
            else:
                y = y0.clone()

                def fn(launch: dict[str, Any] = launch, y: Any = y) -> Any:
                    return lora_expand_segments(t, b, segments, y, offsets, piece, **launch)

                err = rel_err(
                    lora_expand_segments(t, b, segments, y0.clone(), offsets, piece, **launch), y_ref
                )
            ok = err == err and err < (1e-5 if smoke else 2e-2)  # not NaN, and close
            rows_out.append(
                {
                    "launch": launch,
                    "is_today": launch == today,
                    "is_before": launch == BEFORE[kind],
                    "rel_err": err,
                    "ok": ok,
                    "us": variant_us(fn, smoke),
                }
            )
        good = [r for r in rows_out if r["ok"]]
        result[kind] = {
            "variants": rows_out,
            "wrong": [r["launch"] for r in rows_out if not r["ok"]],
            "today": today,
            "today_us": next((r["us"] for r in rows_out if r["is_today"]), None),
            "before_us": next((r["us"] for r in rows_out if r["is_before"]), None),
            "best": min(good, key=lambda r: r["us"]) if good else None,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny layers under TRITON_INTERPRET=1 (CPU)")
    p.add_argument("--layers", default=None, help="comma list of layer names (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    layers = SMOKE["layers"] if args.smoke else LAYERS
    if args.layers:
        layers = tuple(layer for layer in layers if layer[0] in args.layers.split(","))
    t0 = time.perf_counter()
    results = []
    for step in SMOKE["steps"] if args.smoke else STEPS:
        for layer in layers:
            r = sweep(layer, step, args.smoke)
            results.append(r)
            for kind in ("shrink", "expand"):
                best = r[kind]["best"]
                print(
                    f"[sweep-seg] {r['step']} {r['layer']} {kind}: today {r[kind]['today_us']} us "
                    f"{r[kind]['today']} (before {r[kind]['before_us']}), best "
                    f"{best['us'] if best else None} us {best['launch'] if best else None}; "
                    f"wrong {len(r[kind]['wrong'])}",
                    flush=True,
                )
    for step_name, _ in SMOKE["steps"] if args.smoke else STEPS:
        mine = [r for r in results if r["step"] == step_name]
        today = sum((r["shrink"]["today_us"] or 0) + (r["expand"]["today_us"] or 0) for r in mine)
        befores = [r[kind]["before_us"] for r in mine for kind in ("shrink", "expand")]
        before = "n/a" if None in befores else f"{sum(befores):.1f}"  # the smoke grids lack BEFORE
        best = sum(
            (r["shrink"]["best"] or {"us": 0})["us"] + (r["expand"]["best"] or {"us": 0})["us"] for r in mine
        )
        print(
            f"[sweep-seg] {step_name}: a decoder layer's LoRA {today:.1f} us today ({before} before "
            f"segment_launch), {best:.1f} at the best",
            flush=True,
        )
    doc = {"smoke": args.smoke, "elapsed_s": round(time.perf_counter() - t0, 1), "results": results}
    if not args.smoke:
        import torch

        doc["device"] = torch.cuda.get_device_name()
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    return 0 if all(not r[kind]["wrong"] for r in results for kind in ("shrink", "expand")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
