"""Launch-option sweep of the one-token LoRA GEMV (ops/triton/lora_gemv.py) at Llama-3-8B's four LoRA
layers (rank 16, one token on slot 3 of 8), in one short GPU call (A3, issue 13):

    python loadtest/sweep_lora_gemv.py --out sweep_lora_gemv.json

Per layer: the base layer as planned without LoRA (the float GEMV, else cuBLAS), then each variant of
the layer's planned launch (`_LORA_LAUNCHES`' block_n/block_k/split_k/prefetch kept) over the grid
fuse_shrink x shrink_chunk x reduce_t (fused only) x early_b, run through engine.lora.gemv's
lora_gemv_linear as the engine runs it. Each variant is first checked against F.linear + the reference
shrink and expand (twice: the fused launch must put its counters back); a wrong one is reported and
never wins. Timing as loadtest/gpu_timing.py: CUDA-graph replays cycling through weight copies past L2.
The best variant per layer is printed as a ready-to-paste `_LORA_LAUNCHES` entry.

Budget: 4 layers x 18 variants, each ~0.1 s of graph capture and replays; the Triton compiles
(~10-12 kernel variants a layer) are what costs, so `--jobs` processes compile them first, in
parallel, into Triton's disk cache (one layer and fused/not each), and timing stops at `--budget-s`
(the variants left are listed as skipped).

`--chunks`, `--fuse`, `--reduce-t`, `--early-b` narrow the grid (e.g. `--reduce-t 0` if a variant
never returns: a GPU run should sit under `timeout`). `--tiles 512x2,1024x4` widens it: (block_k,
num_warps) pairs tried beside the plan's own. The plans' 512-wide tiles on 4 warps give x's load 4
elements a thread against the weight tile's 8, so x goes through shared memory every tile (what
slowed the FP8 GEMV, ops/triton/fp8_gemv.py's docstring); 512 on 2 warps or 1,024 on 4 do not.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.gpu_timing import rel_err, variant_us  # noqa: E402

RANK, NUM_SLOTS, SLOT = 16, 8, 3
# (name, in, sub-matrices' outputs): a Llama-3-8B decoder layer's LoRA layers (all seven projections)
LAYERS = (
    ("qkv", 4096, (4096, 1024, 1024)),
    ("o", 4096, (4096,)),
    ("gate_up", 4096, (14336, 14336)),
    ("down", 14336, (4096,)),
)
CHUNKS = (128, 256, 512)
# CPU smoke: the same four kinds of layer, tiny, one launch for all (no plan has their shapes)
SMOKE_LAYERS = (
    ("qkv", 128, (32, 16, 16)),
    ("o", 128, (48,)),
    ("gate_up", 128, (32, 32)),
    ("down", 320, (48,)),
)
SMOKE_CHUNKS = (32, 64, 512)  # 512: the default, today's launch
SMOKE_LAUNCH = {"block_n": 16, "block_k": 64, "split_k": 1}
DEFAULT_CHUNK = 512  # ops.triton.lora_gemv.SHRINK_CHUNK and lora_shrink's default split
BASE_KEYS = ("block_n", "block_k", "split_k", "prefetch", "num_warps", "num_stages")


BOTH = (False, True)


def variants(
    chunks: Sequence[int],
    fuse: Sequence[bool] = BOTH,
    reduce_t: Sequence[bool] = BOTH,
    early_b: Sequence[bool] = BOTH,
    tiles: Sequence[tuple[int, int] | None] = (None,),
) -> list[dict[str, Any]]:
    """The grid: 2 x len(chunks) two-launch variants (early_b or not), 4 x len(chunks) fused ones (all
    axes at both values; `--fuse` etc. narrow them), each with every (block_k, num_warps) of `tiles`
    (None: the plan's own)."""
    grid = itertools.product(tiles, fuse, chunks, reduce_t, early_b)
    return [
        {"fuse_shrink": fuse, "shrink_chunk": chunk, "reduce_t": reduce_t, "early_b": early_b, "tiles": tile}
        for tile, fuse, chunk, reduce_t, early_b in grid
        if fuse or not reduce_t
    ]


def launch_of(plan: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """The planned launch's tiles with the variant's options, defaults left out (as a plan holds them)."""
    launch = {key: plan[key] for key in BASE_KEYS if key in plan}
    if variant.get("tiles") is not None:
        launch["block_k"], launch["num_warps"] = variant["tiles"]
    if variant["fuse_shrink"]:
        launch["fuse_shrink"] = True
    if variant["shrink_chunk"] != DEFAULT_CHUNK:
        launch["shrink_chunk"] = variant["shrink_chunk"]
    for key in ("reduce_t", "early_b"):
        if variant[key]:
            launch[key] = True
    return launch


def entry(k: int, n: int, launch: dict[str, Any], comment: str) -> str:
    """One `_LORA_LAUNCHES` line (engine/model/quantization/float_gemv.py)."""
    items = ", ".join(f'"{key}": {value!r}' for key, value in launch.items())
    return f"    ({k}, {n}): {{{items}}},  # {comment}"


def _setup(k: int, sizes: Sequence[int], smoke: bool, copies: int, seed: int) -> dict[str, Any]:
    """The layer's operands: weight copies [N, K], A [slots, S*R, K], block-diagonal B [slots, N, S*R]."""
    import torch

    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    n, dim = sum(sizes), RANK * len(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    ws = [torch.randn(n, k, device=device, generator=gen).mul_(0.02).to(dtype) for _ in range(copies)]
    a = torch.randn(NUM_SLOTS, dim, k, device=device, generator=gen).mul_(0.02).to(dtype)
    b = torch.zeros(NUM_SLOTS, n, dim, device=device, dtype=dtype)
    for i, (start, rows) in enumerate(zip(offsets, sizes, strict=True)):
        block = torch.randn(NUM_SLOTS, rows, RANK, device=device, generator=gen).mul_(0.1)
        b[:, start : start + rows, i * RANK : (i + 1) * RANK] = block.to(dtype)
    x = torch.randn(1, k, device=device, generator=gen).to(dtype)  # [1, K]: one token
    slots = torch.tensor([SLOT], device=device, dtype=torch.int32)
    ones = torch.ones(n, device=device)
    return {"ws": ws, "a": a, "b": b, "x": x, "slots": slots, "ones": ones, "offsets": offsets, "n": n}


def _plans(k: int, n: int, smoke: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Today's LoRA launch of the layer and its base launch without LoRA (None: cuBLAS)."""
    from engine.model.quantization.float_gemv import plan_float_gemv

    if smoke:
        return dict(SMOKE_LAUNCH), None
    plan = plan_float_gemv(k, n, lora=True)
    assert plan is not None, (k, n)
    return dict(plan), plan_float_gemv(k, n)


def _fns(op: dict[str, Any], k: int, smoke: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(base(w), lora(w, launch)): the base layer and the LoRA layer as the engine runs them."""
    import torch.nn.functional as F

    from engine.lora.gemv import lora_gemv_linear
    from ops.triton.fp8_gemv import fp8_gemv
    from ops.triton.lora import lora_shrink

    _, base_launch = _plans(k, op["n"], smoke)

    def base(w: Any) -> Any:
        return fp8_gemv(op["x"], w, op["ones"], **base_launch) if base_launch else F.linear(op["x"], w)

    def lora(w: Any, launch: dict[str, Any]) -> Any:
        args = (op["x"], w, op["ones"], None, lora_shrink, op["a"], op["b"], op["slots"], op["offsets"])
        return lora_gemv_linear(*args, launch)

    return base, lora


def _precompile(task: tuple[int, bool, bool, tuple[int, ...]]) -> str:
    """Compile (into Triton's disk cache) one layer's variants, fused or not: a worker process's job."""
    index, fuse, smoke, axes = task
    name, k, sizes = (SMOKE_LAYERS if smoke else LAYERS)[index]
    op = _setup(k, sizes, smoke, 1, seed=index)
    plan, _ = _plans(k, op["n"], smoke)
    base, lora = _fns(op, k, smoke)
    base(op["ws"][0])
    for variant in variants(*axes):
        if variant["fuse_shrink"] == fuse:
            lora(op["ws"][0], launch_of(plan, variant))
    return f"{name} {'fused' if fuse else 'two launches'}"


def _precompile_all(
    indices: Sequence[int], smoke: bool, axes: tuple[Sequence[Any], ...], jobs: int, deadline: float
) -> None:
    import multiprocessing

    tasks = [(i, fuse, smoke, axes) for i in indices for fuse in axes[1]]
    ctx = multiprocessing.get_context("spawn")  # CUDA in each worker: no fork
    with ctx.Pool(min(jobs, len(tasks))) as pool:  # leaving the block kills what is still running
        done = pool.imap_unordered(_precompile, tasks)
        for _ in tasks:
            try:  # a failure only costs its compiles again in the timing process
                print(
                    f"[sweep-lora] compiled {done.next(timeout=max(1.0, deadline - time.monotonic()))}",
                    flush=True,
                )
            except (
                multiprocessing.TimeoutError
            ):  # e.g. a variant that never returns: the timing would hang on it too
                print(
                    "[sweep-lora] precompile past its deadline: stopped (see which layers compiled above)",
                    flush=True,
                )
                break
            except Exception as exc:  # noqa: BLE001
                print(f"[sweep-lora] precompile failed: {exc!r}", flush=True)


def sweep_layer(index: int, smoke: bool, axes: tuple[Sequence[Any], ...], deadline: float) -> dict[str, Any]:
    """One layer: base, then every variant checked, then timed (until the deadline)."""
    import torch
    import torch.nn.functional as F

    from ops import reference
    from ops.triton.lora_gemv import _sync_counters

    name, k, sizes = (SMOKE_LAYERS if smoke else LAYERS)[index]
    n = sum(sizes)
    if smoke:
        copies = 1
    else:
        from loadtest.gpu_timing import copies_past_l2

        copies = copies_past_l2(n * k * 2)  # distinct bf16 weights, so no call finds its weight in L2
    op = _setup(k, sizes, smoke, copies, seed=index)
    plan, _ = _plans(k, n, smoke)
    base, lora = _fns(op, k, smoke)
    tol = 1e-5 if smoke else 1e-2
    t_ref = reference.lora_shrink(op["x"], op["a"], op["slots"])
    ref = reference.lora_expand(
        t_ref, op["b"], op["slots"], F.linear(op["x"].float(), op["ws"][0].float()), op["offsets"]
    )
    today = {key: value for key, value in plan.items() if key in BASE_KEYS or value}
    result: dict[str, Any] = {"layer": name, "k": k, "n": n, "plan": today, "variants": []}
    result["base_us"] = variant_us([lambda w=w: base(w) for w in op["ws"]], smoke)
    for variant in variants(*axes):
        launch = launch_of(plan, variant)
        row: dict[str, Any] = {**variant, "launch": launch, "is_plan": launch == today}
        result["variants"].append(row)
        if time.monotonic() > deadline:  # over the budget: neither compiled nor checked nor timed
            row.update(rel_err=None, ok=None, us=None)
            continue
        errs = [rel_err(lora(op["ws"][0], launch), ref) for _ in range(2)]  # twice: counters put back
        if not smoke:
            torch.cuda.synchronize()
        clean = _sync_counters(op["x"].device).tolist() == [0, 0, 0]
        row["rel_err"] = max(errs)
        row["ok"] = all(e < tol for e in errs) and clean  # NaN fails
        ok = row["ok"]
        row["us"] = (
            variant_us([lambda w=w, launch=launch: lora(w, launch) for w in op["ws"]], smoke) if ok else None
        )
    timed = [r for r in result["variants"] if r["ok"]]
    plan_rows = [r for r in timed if r["is_plan"]]
    result["plan_us"] = plan_rows[0]["us"] if plan_rows else None
    result["best"] = min(timed, key=lambda r: r["us"]) if timed else None
    result["wrong"] = [r["launch"] for r in result["variants"] if r["ok"] is False]
    result["skipped"] = [r["launch"] for r in result["variants"] if r["ok"] is None]
    best = result["best"]
    print(
        f"[sweep-lora] {name} {k}x{n}: base {result['base_us']} us, plan {result['plan_us']} us, "
        f"best {best and best['us']} us {best and best['launch']}; wrong {len(result['wrong'])}, "
        f"skipped {len(result['skipped'])}",
        flush=True,
    )
    del op
    if not smoke:
        torch.cuda.empty_cache()
    return result


def entries(results: Sequence[dict[str, Any]]) -> list[str]:
    """The best launch per layer as `_LORA_LAUNCHES` lines, with the times they beat."""
    lines = []
    for r in results:
        best = r["best"]
        if best is None:
            lines.append(f"    # {r['layer']} ({r['k']}, {r['n']}): no variant both right and timed")
            continue
        comment = f"{r['layer']}: {best['us']} us vs plan {r['plan_us']}, base {r['base_us']}"
        lines.append(entry(r["k"], r["n"], best["launch"], comment))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--layers", default="qkv,o,gate_up,down", help="which of qkv, o, gate_up, down")
    p.add_argument(
        "--budget-s", type=float, default=80.0, help="stop timing variants after this many seconds"
    )
    p.add_argument(
        "--jobs", type=int, default=None, help="compile processes first (0: none; default 8 on GPU)"
    )
    p.add_argument(
        "--chunks", default=None, help="shrink_chunk values (default 128,256,512; smoke 32,64,512)"
    )
    p.add_argument("--fuse", default="0,1", help="fuse_shrink values tried: 0,1 (or one of them)")
    p.add_argument("--reduce-t", default="0,1", help="reduce_t values tried (fused variants only)")
    p.add_argument("--early-b", default="0,1", help="early_b values tried")
    p.add_argument(
        "--tiles", default="", help="(block_k, num_warps) pairs tried beside the plan's, e.g. 512x2,1024x4"
    )
    p.add_argument("--smoke", action="store_true", help="tiny layers on CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    start = time.monotonic()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    table = SMOKE_LAYERS if args.smoke else LAYERS
    chunks = (
        [int(c) for c in args.chunks.split(",")] if args.chunks else (SMOKE_CHUNKS if args.smoke else CHUNKS)
    )
    tiles: list[tuple[int, int] | None] = [None]
    for pair in filter(None, args.tiles.split(",")):
        block_k, _, warps = pair.partition("x")
        if not (block_k.isdigit() and warps.isdigit()):
            p.error(f"--tiles: {pair!r} is not BLOCK_KxNUM_WARPS (e.g. 512x2)")
        tiles.append((int(block_k), int(warps)))
    axes = (
        tuple(chunks),
        *(tuple(bool(int(v)) for v in a.split(",")) for a in (args.fuse, args.reduce_t, args.early_b)),
        tuple(tiles),
    )
    wanted = args.layers.split(",")
    unknown = set(wanted) - {name for name, _, _ in table}
    if unknown:
        p.error(f"--layers: unknown {sorted(unknown)} (of qkv, o, gate_up, down)")
    indices = [i for i, (name, _, _) in enumerate(table) if name in wanted]
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: use --smoke for the CPU check")
    print(
        f"[sweep-lora] {len(indices)} layers x {len(variants(*axes))} variants, budget {args.budget_s} s",
        flush=True,
    )
    jobs = args.jobs if args.jobs is not None else (0 if args.smoke else 8)
    if jobs > 0:
        _precompile_all(indices, args.smoke, axes, jobs, start + 0.6 * args.budget_s)
        print(f"[sweep-lora] precompiled in {time.monotonic() - start:.1f} s", flush=True)
    deadline = start + args.budget_s
    results = [sweep_layer(i, args.smoke, axes, deadline) for i in indices]
    lines = entries(results)
    print("# _LORA_LAUNCHES (engine/model/quantization/float_gemv.py), best per layer:")
    print("\n".join(lines), flush=True)
    elapsed = round(time.monotonic() - start, 1)
    print(f"[sweep-lora] done in {elapsed} s", flush=True)
    if args.out:
        doc = {"smoke": args.smoke, "elapsed_s": elapsed, "layers": results, "entries": lines}
        if not args.smoke:
            import torch

            doc["device"] = torch.cuda.get_device_name()
        Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
    wrong = sum(len(r["wrong"]) for r in results)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
