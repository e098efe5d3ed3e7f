"""gpu_kernel_check.py's `moe` part: the fused MoE kernel (ops/triton/fused_moe.py) at real layer shapes.

One layer of Mixtral-8x7B (8 experts, top-2, hidden 4096, intermediate 14336) and of Qwen3-30B-A3B (128
experts, top-8, hidden 2048, intermediate 768), bf16, at 1, 8, 64, 512 and 4096 tokens. Hidden states
N(0, 1), weights N(0, 1/fan_in); routing as the models route (softmax of random logits, top-k,
renormalised), and a skewed one where every token picks the same top_k experts.

1. Correctness, outputs poisoned (NaN) first. Against ops.reference.fused_moe in float32 on the upcast
   inputs: rel err ||out - ref|| / ||ref|| < 1e-2 (bf16 rounds [gate | up], the activation, the down
   projection and each weighted row: about 0.5% in all). Against the reference in bf16 (the spec's own
   rounding steps, cuBLAS GEMMs): < 5e-3 (only the accumulation order differs, so a few roundings flip).
2. CUDA graphs: fused_moe captured once per (shape, token count) with static inputs, then replayed twice
   after new hidden states and a new routing are copied in: each against the float32 reference of the
   new inputs (< 1e-2).
3. Timings, ms per call: in CUDA graphs (as the engine runs decode) cycling over copies routed
   differently, so different experts are read; the floor is the bytes the op must move (the touched
   experts' weights, the hidden states in and out, the intermediate rows written and read back) over
   the measured copy bandwidth; the same op launched eagerly, and a plain torch per-expert loop
   (ops.reference.fused_moe in bf16, what transformers' eager experts do; eager only: its expert list
   syncs the host); TFLOP/s at 6 * pairs * hidden * intermediate.
   The graph time twice: with the one-launch alignment kernel (WEIR_MOE_ALIGN_KERNEL=1, where fused_moe
   uses it: up to ALIGN_KERNEL_MAX_PAIRS pairs) and with the torch alignment ops (=0).
4. The alignment kernel (loadtest/kernel_check_moe_align.py): bit for bit against the torch ops at 1..8192
   tokens, and both alone in graphs.
5. Integer experts (loadtest/kernel_check_moe_int.py): the W4A16 variant in the checkpoint's column order
   and with act order (x gathered per expert), correctness at 8 tokens and times in graphs at 1-64.
6. Tile sweep at 1, 64, 512 and 4096 tokens: BLOCK_M x (BLOCK_N, BLOCK_K, warps, stages) through the same
   kernel and launch as ops.triton.fused_moe (checked bit for bit at its own tiles), each GEMM and the
   whole op timed in graphs; a variant whose output is > 5e-3 from the default's is marked wrong and
   never best. Variants stop starting after `budget_s` seconds (decode token counts first).

Smoke form (CPU, Triton interpreter, float32: the interpreter's bf16 dots are wrong): two tiny layers,
1, 8 and 70 tokens (70 takes the 64-row blocks), the sweep at 70 tokens over two tiles; times are one
wall-clock call.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from loadtest.gpu_timing import copies_past_l2, rel_err
from loadtest.kernel_check_common import (
    Poisoned,
    Replay,
    check_close,
    check_true,
    eager_ms,
    guarded,
    sync,
    time_ms,
)
from loadtest.kernel_check_moe_align import align_correctness, align_kernel, align_timing, print_align_summary
from loadtest.kernel_check_moe_int import int_experts_part
from ops import reference


@dataclass(frozen=True)
class MoeShape:
    experts: int
    top_k: int
    hidden: int
    intermediate: int  # each expert's


SHAPES = {
    "mixtral-8x7b": MoeShape(8, 2, 4096, 14336),
    "qwen3-30b-a3b": MoeShape(128, 8, 2048, 768),
}
SMOKE_SHAPES = {"tiny-mixtral": MoeShape(4, 2, 64, 48), "tiny-qwen3-moe": MoeShape(16, 4, 32, 16)}
TOKENS, SMOKE_TOKENS = (1, 8, 64, 512, 4096), (1, 8, 70)
SMOKE_TIMED_TOKENS = (1, 70)
GRAPH_TOKENS, SMOKE_GRAPH_TOKENS = (8, 512), (8,)
SWEEP_TOKENS, SMOKE_SWEEP_TOKENS = (1, 64, 512, 4096), (70,)
TOL_FP32 = 1e-2  # vs the float32 reference: bf16's roundings
TOL_SPEC = 5e-3  # vs the reference in the kernel's dtype (same rounding steps), and sweep variants vs default


@dataclass(frozen=True)
class Tile:
    """A GEMM launch's tiles; None: ops.triton.fused_moe's own rule (BLOCK_N / BLOCK_K), Triton's
    default stages."""

    block_n: int | None = None
    block_k: int | None = None
    num_warps: int = 4
    num_stages: int | None = None

    def label(self) -> str:
        if self == Tile():
            return "ops default"
        return f"n{self.block_n} k{self.block_k} w{self.num_warps} s{self.num_stages}"


SWEEP_TILES = (
    Tile(),
    Tile(32, 64, 4, 3),
    Tile(32, 128, 4, 4),
    Tile(64, 64, 4, 4),
    Tile(64, 128, 4, 3),
    Tile(128, 64, 4, 3),
    Tile(128, 64, 8, 4),
    Tile(128, 128, 8, 3),
    Tile(256, 64, 8, 3),
)
SMOKE_TILES = (Tile(), Tile(16, 32, 2, 2))


def sweep_block_ms(num_tokens: int, smoke: bool) -> tuple[int, ...]:
    if smoke:
        return (16,) if num_tokens <= 64 else (32, 64)
    if num_tokens <= 8:
        return (16,)
    return (16, 32, 64) if num_tokens <= 64 else (32, 64, 128)


# ---------------------------------------------------------------- inputs


def make_layer(shape: MoeShape, dtype: torch.dtype, device: torch.device, seed: int) -> tuple:
    """(w13 [E, 2I, H], w2 [E, H, I]) drawn expert by expert (no float32 copy of a whole layer)."""
    g = torch.Generator(device=device).manual_seed(seed)
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    w13 = torch.empty(e, 2 * i, h, device=device, dtype=dtype)
    w2 = torch.empty(e, h, i, device=device, dtype=dtype)
    for x in range(e):
        w13[x] = torch.randn(2 * i, h, device=device, generator=g) * h**-0.5
        w2[x] = torch.randn(h, i, device=device, generator=g) * i**-0.5
    return w13, w2


def make_tokens(
    shape: MoeShape,
    num_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    skewed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], topk_weights [T, k] float32, topk_ids [T, k] int64), routed as the models do:
    softmax in float32, top-k, renormalised. skewed: every token on experts 0..k-1."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, shape.hidden, device=device, generator=g).to(dtype)
    logits = torch.randn(num_tokens, shape.experts, device=device, generator=g)
    if skewed:
        logits[:, : shape.top_k] += 100.0
    weights, ids = torch.softmax(logits, dim=-1).topk(shape.top_k, dim=-1)
    return x, weights / weights.sum(dim=-1, keepdim=True), ids


def moe_bytes(shape: MoeShape, ids: torch.Tensor, itemsize: int) -> tuple[int, int]:
    """(the touched experts' weight bytes, all bytes the op must move: weights, hidden states in and
    out, the [pairs, I] and [pairs, H] intermediates written and read back)."""
    touched = int(ids.unique().numel())
    weights = touched * 3 * shape.hidden * shape.intermediate * itemsize
    tokens, pairs = ids.shape[0], ids.numel()
    acts = 2 * tokens * shape.hidden + 2 * pairs * (shape.intermediate + shape.hidden)
    return weights, weights + acts * itemsize


# ---------------------------------------------------------------- the kernel with chosen tiles


def launch_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    top_k: int,
    block_m: int,
    tile: Tile,
    gated: bool,
) -> None:
    """ops.triton.fused_moe's GEMM launch with this tile (its own launch when tile == Tile())."""
    from ops.triton.fused_moe import launch_moe_gemm

    launch_moe_gemm(
        a, w, out, weights, align, top_k, block_m, gated,
        block_n=tile.block_n, block_k=tile.block_k, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip


class TiledMoe:
    """fused_moe's steps for one batch with a chosen BLOCK_M: the alignment once, then each GEMM (and
    the whole op) with any tile, into buffers held here."""

    def __init__(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tw: torch.Tensor, ti: torch.Tensor, block_m: int) -> None:  # fmt: skip
        from ops.triton.fused_moe import moe_align_block_size

        self.x, self.w13, self.w2, self.tw, self.ti, self.block_m = x, w13, w2, tw, ti, block_m
        self.top_k = ti.shape[1]
        self.align = moe_align_block_size(ti, w13.shape[0], block_m)
        pairs = ti.numel()
        self.act = torch.empty(pairs, w13.shape[1] // 2, dtype=x.dtype, device=x.device)  # [pairs, I]
        self.down = torch.empty(pairs, x.shape[1], dtype=x.dtype, device=x.device)  # [pairs, H]
        self.weights = tw.reshape(-1).to(torch.float32)  # [pairs]

    def gemm1(self, tile: Tile) -> None:
        launch_gemm(
            self.x, self.w13, self.act, self.weights, self.align, self.top_k, self.block_m, tile, True
        )

    def gemm2(self, tile: Tile) -> None:
        launch_gemm(
            self.act, self.w2, self.down, self.weights, self.align, self.top_k, self.block_m, tile, False
        )

    def whole(self, tile: Tile) -> torch.Tensor:
        """The op as ops.triton.fused_moe runs it, with this tile: its own alignment and buffers (so a
        CUDA graph that captures it leaves the ones above alone)."""
        from ops.triton.fused_moe import moe_align_block_size

        x, top_k = self.x, self.top_k
        align = moe_align_block_size(self.ti, self.w13.shape[0], self.block_m)
        act = torch.empty_like(self.act)  # [pairs, I]
        launch_gemm(x, self.w13, act, self.weights, align, top_k, self.block_m, tile, True)
        down = torch.empty_like(self.down)  # [pairs, H]
        launch_gemm(act, self.w2, down, self.weights, align, top_k, self.block_m, tile, False)
        t, h = x.shape
        return down.view(t, top_k, h).sum(dim=1, dtype=torch.float32).to(x.dtype)


# ---------------------------------------------------------------- the part


def moe_part(results: dict, device: torch.device, smoke: bool, budget_s: float = 120.0) -> None:
    import ops.triton as tops

    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = SMOKE_SHAPES if smoke else SHAPES
    if os.environ.get("WEIR_MOE_ONLY") == "int":  # the integer experts alone (device step moei)
        guarded(results, "moe int4 experts", int_experts_part, results, shapes, device, smoke, make_tokens)
        return
    layers = {name: make_layer(s, dtype, device, seed=i) for i, (name, s) in enumerate(shapes.items())}
    results.setdefault("info", {})["moe"] = {
        "shapes": {k: dataclasses.asdict(v) for k, v in shapes.items()},
        "dtype": str(dtype),
        "tolerances": {"vs_float32_reference": TOL_FP32, "vs_reference_in_kernel_dtype": TOL_SPEC},
    }
    for name, shape in shapes.items():
        w13, w2 = layers[name]
        tokens = SMOKE_TOKENS if smoke else TOKENS
        guarded(
            results, f"{name} correctness", correctness, results, name, shape, w13, w2, tokens, tops.fused_moe
        )
        tokens = SMOKE_GRAPH_TOKENS if smoke else GRAPH_TOKENS
        guarded(results, f"{name} CUDA graphs", graphs, results, name, shape, w13, w2, tokens, tops.fused_moe)
        guarded(
            results, f"{name} moe_align correctness", align_correctness, results, name, shape, device, smoke
        )
    copy = results.get("copy_bandwidth_gbs", float("nan"))
    for name, shape in shapes.items():
        w13, w2 = layers[name]
        for num_tokens in SMOKE_TIMED_TOKENS if smoke else TOKENS:
            args = (results, name, shape, w13, w2, num_tokens, copy, tops.fused_moe)
            guarded(results, f"{name} {num_tokens} tok timing", timing, *args)
        guarded(results, f"{name} moe_align timing", align_timing, results, name, shape, device, smoke)
    guarded(results, "moe int4 experts", int_experts_part, results, shapes, device, smoke, make_tokens)
    guarded(results, "moe tile sweep", sweep, results, shapes, layers, smoke, budget_s)


def correctness(results: dict, name: str, shape: MoeShape, w13: torch.Tensor, w2: torch.Tensor, token_counts: tuple[int, ...], fused_moe) -> None:  # fmt: skip  # noqa: ANN001
    w13f, w2f = w13.float(), w2.float()
    cases = [(t, False) for t in token_counts] + [(token_counts[-2], True)]
    for num_tokens, skewed in cases:
        x, tw, ti = make_tokens(shape, num_tokens, w13.dtype, w13.device, seed=num_tokens, skewed=skewed)
        with Poisoned():
            out = fused_moe(x, w13, w2, tw, ti)
        label = f"{name} fused_moe {num_tokens} tok{' skewed' if skewed else ''}"
        check_close(results, f"{label} vs float32 reference", out, reference.fused_moe(x.float(), w13f, w2f, tw, ti), TOL_FP32)  # fmt: skip
        check_close(results, f"{label} vs reference in {str(w13.dtype)[6:]}", out, reference.fused_moe(x, w13, w2, tw, ti), TOL_SPEC)  # fmt: skip
    del w13f, w2f


def graphs(results: dict, name: str, shape: MoeShape, w13: torch.Tensor, w2: torch.Tensor, token_counts: tuple[int, ...], fused_moe) -> None:  # fmt: skip  # noqa: ANN001
    """Capture once, replay with new contents in the static inputs (a new step's tokens and routing)."""
    w13f, w2f = w13.float(), w2.float()
    for num_tokens in token_counts:
        x, tw, ti = make_tokens(shape, num_tokens, w13.dtype, w13.device, seed=1000 + num_tokens)
        captured = Replay(lambda x=x, tw=tw, ti=ti: fused_moe(x, w13, w2, tw, ti), w13.device)
        for round_ in (1, 2):
            nx, ntw, nti = make_tokens(
                shape, num_tokens, w13.dtype, w13.device, seed=2000 + 7 * round_ + num_tokens
            )
            x.copy_(nx)
            tw.copy_(ntw)
            ti.copy_(nti)
            out = captured.replay()
            ref = reference.fused_moe(nx.float(), w13f, w2f, ntw, nti)
            check_close(results, f"{name} fused_moe {num_tokens} tok: CUDA graph replay {round_} (new routing)", out, ref, TOL_FP32)  # fmt: skip


def timing(results: dict, name: str, shape: MoeShape, w13: torch.Tensor, w2: torch.Tensor, num_tokens: int, copy_gbs: float, fused_moe) -> None:  # fmt: skip  # noqa: ANN001
    device, itemsize = w13.device, w13.element_size()
    first = make_tokens(shape, num_tokens, w13.dtype, device, seed=3000 + num_tokens)
    weight_bytes, all_bytes = moe_bytes(shape, first[2], itemsize)
    copies = [first]
    if device.type == "cuda":  # different routings so consecutive calls read different experts
        more = min(8, copies_past_l2(all_bytes)) - 1
        copies += [
            make_tokens(shape, num_tokens, w13.dtype, device, seed=3001 + num_tokens + c) for c in range(more)
        ]
    fns = [lambda c=c: fused_moe(c[0], w13, w2, c[1], c[2]) for c in copies]
    x, tw, ti = first
    eager = eager_ms(lambda: fused_moe(x, w13, w2, tw, ti), device)
    graph_error = None
    try:
        with align_kernel(True):
            ms = time_ms(fns, device)
        with align_kernel(False):
            ms_torch_align = time_ms(fns, device)
    except Exception as exc:  # noqa: BLE001  (a capture that fails: the eager time stands in, marked)
        graph_error, ms, ms_torch_align = f"{type(exc).__name__}: {str(exc)[:200]}", eager, eager
    loop = eager_ms(lambda: reference.fused_moe(x, w13, w2, tw, ti), device, reps=5)
    floor_ms = all_bytes / (copy_gbs * 1e6)
    flops = 6 * ti.numel() * shape.hidden * shape.intermediate
    row = {
        "shape": name,
        "tokens": num_tokens,
        "ms_graph": ms,  # the alignment kernel where fused_moe uses it (WEIR_MOE_ALIGN_KERNEL=1)
        "ms_graph_torch_align": ms_torch_align,  # WEIR_MOE_ALIGN_KERNEL=0
        "ms_eager": eager,
        "torch_loop_ms": loop,
        "touched_experts": int(ti.unique().numel()),
        "weight_bytes": weight_bytes,
        "min_bytes": all_bytes,
        "floor_ms": floor_ms,
        "frac_floor": floor_ms / ms,
        "tflops": flops / ms / 1e9,
        "speedup_vs_torch_loop": loop / ms,
        "graph_error": graph_error,
    }
    results["timings"].setdefault("moe", []).append(row)
    print(
        f"  {name:14s} {num_tokens:5d} tok: {ms * 1e3:9.1f} us in graphs ({row['frac_floor']:4.0%} of the "
        f"{floor_ms * 1e3:.1f} us floor, {row['touched_experts']} experts, {row['tflops']:.0f} TFLOP/s); "
        f"torch alignment {ms_torch_align * 1e3:.1f} us; eager {eager * 1e3:.1f} us; torch loop {loop * 1e3:.1f} us (x{row['speedup_vs_torch_loop']:.1f})",
        flush=True,
    )


def sweep(results: dict, shapes: dict[str, MoeShape], layers: dict, smoke: bool, budget_s: float) -> None:
    """Block sizes, warps and stages of both GEMMs; the default launch first, checked bit for bit."""
    import ops.triton as tops
    from ops.triton.fused_moe import default_block_m

    start = time.time()
    rows = results["timings"].setdefault("moe_sweep", [])
    tiles = SMOKE_TILES if smoke else SWEEP_TILES
    cut = False
    for num_tokens in SMOKE_SWEEP_TOKENS if smoke else SWEEP_TOKENS:
        for name, shape in shapes.items():
            w13, w2 = layers[name]
            device = w13.device
            x, tw, ti = make_tokens(shape, num_tokens, w13.dtype, device, seed=4000 + num_tokens)
            default_m = default_block_m(num_tokens)
            ref = tops.fused_moe(x, w13, w2, tw, ti)
            mine = TiledMoe(x, w13, w2, tw, ti, default_m).whole(Tile())
            sync(device)
            check_true(results, f"{name} {num_tokens} tok: the sweep's launch at ops' tiles == ops.triton.fused_moe (bit for bit)", torch.equal(mine, ref))  # fmt: skip
            block_ms = sorted({default_m, *sweep_block_ms(num_tokens, smoke)})
            for block_m in block_ms:
                run = TiledMoe(x, w13, w2, tw, ti, block_m)
                for tile in tiles:
                    if time.time() - start > budget_s:
                        cut = True
                        break
                    row = {
                        "shape": name,
                        "tokens": num_tokens,
                        "block_m": block_m,
                        **dataclasses.asdict(tile),
                    }
                    row["default"] = block_m == default_m and tile == Tile()
                    try:
                        err = rel_err(run.whole(tile), ref)
                        row |= {
                            "rel_err": err,
                            "ok": err <= TOL_SPEC,  # NaN is not
                            "gemm1_ms": time_ms(lambda t=tile, r=run: r.gemm1(t), device),
                            "gemm2_ms": time_ms(lambda t=tile, r=run: r.gemm2(t), device),
                            "ms": time_ms(lambda t=tile, r=run: r.whole(t), device),
                        }
                    except Exception as exc:  # noqa: BLE001  (out of shared memory or registers)
                        row |= {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                    rows.append(row)
            report_best(rows, name, num_tokens)
    if cut:
        print(f"  (sweep budget of {budget_s:.0f}s spent: later variants not run)", flush=True)
    results["info"].setdefault("moe", {})["sweep_cut_short"] = cut


def report_best(rows: list[dict], name: str, num_tokens: int) -> None:
    mine = [r for r in rows if r["shape"] == name and r["tokens"] == num_tokens]
    good = [r for r in mine if r.get("ok")]
    default = next((r for r in mine if r["default"] and "ms" in r), None)
    if not good or default is None:
        print(f"  sweep {name} {num_tokens} tok: no timed variant", flush=True)
        return
    best = min(good, key=lambda r: r["ms"])
    g1 = min(good, key=lambda r: r["gemm1_ms"])
    g2 = min(good, key=lambda r: r["gemm2_ms"])
    wrong = sum(1 for r in mine if "rel_err" in r and not r["ok"])
    failed = sum(1 for r in mine if "error" in r)
    print(
        f"  sweep {name:14s} {num_tokens:5d} tok: default {default['ms'] * 1e3:.1f} us; best "
        f"{best['ms'] * 1e3:.1f} us (x{default['ms'] / best['ms']:.2f}) at {describe(best)}; best GEMM1 "
        f"{describe(g1)} {g1['gemm1_ms'] * 1e3:.1f} us, GEMM2 {describe(g2)} {g2['gemm2_ms'] * 1e3:.1f} us"
        f"; {len(mine)} variants ({wrong} wrong, {failed} failed to run)",
        flush=True,
    )


def describe(row: dict) -> str:
    tile = Tile(row["block_n"], row["block_k"], row["num_warps"], row["num_stages"])
    return f"m{row['block_m']} {tile.label()}"


def print_summary(results: dict) -> None:
    rows = results["timings"].get("moe", [])
    print(
        "fused MoE (one layer): us in CUDA graphs / % of the bytes floor / with the torch alignment ops us"
        " / torch per-expert loop us (speedup)"
    )
    for r in rows:
        print(
            f"  {r['shape']:14s} {r['tokens']:5d} tok {r['ms_graph'] * 1e3:9.1f} us {r['frac_floor']:5.0%}"
            f"  torch align {r['ms_graph_torch_align'] * 1e3:9.1f} us  loop {r['torch_loop_ms'] * 1e3:9.1f} us (x{r['speedup_vs_torch_loop']:.1f})"
        )
    print_align_summary(results)
    sweep_rows = results["timings"].get("moe_sweep", [])
    for name, num_tokens in sorted({(r["shape"], r["tokens"]) for r in sweep_rows}):
        report_best(sweep_rows, name, num_tokens)
