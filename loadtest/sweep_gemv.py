"""Launch-shape sweep of the decode GEMVs (ops/triton/wna16_gemv.py, w4_half2_gemv.py, fp8_gemv.py) at a model's four
linear shapes, against bf16 F.linear (cuBLAS) and the W4A16 dot kernel's planned launch, in one GPU call;
at 1-8 tokens also the float-weight GEMV on the bf16 weights themselves (`bf16_gemv`), and with `--kinds skinny`
the tensor-core skinny GEMM (ops/triton/skinny_gemm.py) on them at 2-16 tokens (`skinny`; `--skinny-launches-out`
writes its winners as WEIR_SKINNY_GEMM_LAUNCHES reads them) and, with `fp8` too, on the FP8 weights (`fp8_skinny`).

    python loadtest/sweep_gemv.py --shape llama3-8b --out sweep.json

Timing as Q5 (loadtest/gpu_timing.py): CUDA-graph replays cycling through enough weight copies to
miss L2. Each configuration is also checked against dequantize + matmul on the first copy (a wrong
answer, e.g. a split-K race, is reported and the configuration never wins). The result names the best
launch per shape and batch; engine.model.quantization's planners take their tables from it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.gpu_timing import copies_past_l2, graph_ms, rel_err  # noqa: E402
from loadtest.model_shapes import SHAPES  # noqa: E402

# the W4A16 GEMV (and dot kernel), the packed-fp16 W4A16 GEMV, the FP8 GEMV, the bf16 GEMV, gate_up's
# gated launches, the tensor-core skinny GEMM on the bf16 weights
KINDS = frozenset({"w4", "w4h", "fp8", "bf16", "gated", "skinny"})

# per batch: the launches tried (batch 1 widest: it is the latency that matters most)
W4_GRIDS = {
    1: {  # wna16_gemv's float32 decode (8-bit codes, float32 x; 4-bit layers take the folded GEMV, w4h)
        "block_n": (64,),
        "block_k": (128,),
        "split_k": (8, 16),
        "num_warps": (4,),
        "prefetch": (False, True),
    },
    2: {
        "block_n": (64, 128),
        "block_k": (128,),
        "split_k": (2, 4, 8),
        "num_warps": (4,),
        "prefetch": (False,),
    },
    4: {
        "block_n": (64, 128),
        "block_k": (128,),
        "split_k": (2, 4, 8),
        "num_warps": (4,),
        "prefetch": (False, True),
    },
    8: {"block_n": (64, 128), "block_k": (128,), "split_k": (1, 2), "num_warps": (4,)},
    16: {"block_n": (64, 128), "block_k": (128,), "split_k": (1, 2), "num_warps": (4,)},
}
# The packed-fp16 W4A16 GEMV (ops/triton/w4_half2_gemv.py): tiles requested `ahead` of the decoded one;
# at 2 and 4 tokens also x's next pairs with them (x_ahead, planned at one token only)
_W4H_FEW_ROWS = [
    {"block_n": (64, 128), "block_k": (128,), "split_k": (2, 4, 8), "num_warps": (4,), "ahead": (1, 2)},
    {
        "block_n": (64,),
        "block_k": (128,),
        "split_k": (2, 4, 8),
        "num_warps": (2, 4),
        "ahead": (1,),
        "x_ahead": (True,),
    },
]
W4H_GRIDS: dict[int, dict[str, tuple[Any, ...]] | list[dict[str, tuple[Any, ...]]]] = {
    1: [
        {  # 256-word tiles: 1 KB runs of each word row (the FP8 GEMV reads 1 KB runs)
            "block_n": (64, 128, 256),
            "block_k": (128,),
            "split_k": (4, 8, 16),
            "num_warps": (2, 4),
            "ahead": (1, 2),
        },
        {  # x's next pairs requested with the next tile
            "block_n": (64, 128, 256),
            "block_k": (128,),
            "split_k": (4, 8, 16),
            "num_warps": (2, 4),
            "ahead": (1,),
            "x_ahead": (True,),
        },
        {  # narrow tiles over (nearly) all of K: few or no partials, tickets and fences
            "block_n": (16, 32, 64),
            "block_k": (128,),
            "split_k": (1, 2),
            "num_warps": (2, 4),
            "ahead": (2,),
        },
    ],
    2: _W4H_FEW_ROWS,
    4: _W4H_FEW_ROWS,
}
# (block_k, num_warps) pairs: block_k = 8 * 32 * num_warps reads x in the weight tile's own layout
# (ops/triton/fp8_gemv.py's docstring); (256, 4) is the launch the planner took before that change
_FLOAT_KW = ((256, 4), (512, 2), (1024, 4), (2048, 8))
FP8_GRIDS: dict[int, Any] = {
    1: {
        "block_n": (4, 8, 16),
        "block_k_warps": _FLOAT_KW,
        "split_k": (1, 2, 4),
        "prefetch": (False, True),
    },
    2: {"block_n": (4, 8, 16), "block_k_warps": ((256, 4), (512, 2), (1024, 4)), "split_k": (1, 2)},
    4: {"block_n": (16, 32), "block_k": (256,), "split_k": (1, 2), "num_warps": (4,)},
    8: {"block_n": (16, 32), "block_k": (256,), "split_k": (1, 2), "num_warps": (4,)},
    16: {"block_n": (16, 32), "block_k": (256,), "split_k": (1, 2), "num_warps": (4,)},
}

# One token, the tile loads pipelined by Triton through shared memory (fp8_gemv's loop_stages; the GEMV waits
# on memory for most of its samples, loadtest/results/w4-pipeline-stalls-h100-2026-12-07-1396ef1/)
FP8_STAGED_GRID = {
    "block_n": (4, 8),
    "block_k_warps": ((512, 2), (1024, 4)),
    "split_k": (1, 2),
    "loop_stages": (3, 4),
}


# The float-weight GEMV (ops/triton/fp8_gemv.py) on bf16 weights, batch 1 only; (512, 4): the old launch
BF16_GRIDS: dict[int, Any] = {
    1: {
        "block_n": (4, 8, 16),
        "block_k_warps": ((512, 4), (512, 2), (1024, 4), (2048, 8)),
        "split_k": (1, 2),
        "prefetch": (False, True),
    },
    # L1's batch 8 runs cuBLAS (0.84 of the roofline at 5a5b861 against batch 1's 0.90): whether the
    # GEMV, a weight tile shared by the row groups' programs through L2, reads faster at 2-8 tokens
    **{
        m: {"block_n": (8, 16, 32), "block_k_warps": ((256, 4), (512, 2), (512, 4)), "split_k": (1, 2)}
        for m in (2, 4, 8)
    },
}


# The tensor-core skinny GEMM (ops/triton/skinny_gemm.py) on the bf16 weights, 2-16 tokens: whether it reads
# the attention side's weights faster than cuBLAS at L1's batch 8 (qkv 0.82, o 0.75 of the copy bandwidth)
SKINNY_GRID = {
    "block_n": (64, 128),
    "block_k": (128, 256),
    "split_k": (1, 2, 4, 8),
    "num_warps": (4,),
    "num_stages": (3, 5),
}
# The skinny GEMM on FP8 weights (W8A16, --kinds fp8,skinny), 1-16 tokens: against the FP8 GEMV (Q2's batch-1
# projections) and torch._scaled_mm; FP8 tiles are half a bf16 tile's bytes, so deeper K tiles too
FP8_SKINNY_GRID = {
    "block_n": (32, 64, 128),
    "block_k": (128, 256),
    "split_k": (1, 2, 4),
    "num_warps": (4,),
    "num_stages": (3, 5),
}
# --skinny-max-shared-kb: launches that fit in that much shared memory (48: below Triton's opt-in to
# oversized shared memory, which sets a kernel's L1 to 8 KB), from a grid of smaller tiles
SKINNY_SMALL_GRID = {
    "block_n": (32, 64),
    "block_k": (64, 128),
    "split_k": (1, 2, 4),
    "num_warps": (4,),
    "num_stages": (2, 3, 4),
}


def _grid(grid: dict[str, tuple[Any, ...]] | list[dict[str, tuple[Any, ...]]]) -> list[dict[str, int]]:
    """Every launch of the grid (of each grid, for a list); a `block_k_warps` pair becomes block_k and
    num_warps. Bools are ints."""
    if isinstance(grid, list):
        return [cfg for part in grid for cfg in _grid(part)]
    launches = []
    for values in itertools.product(*grid.values()):
        cfg = dict(zip(grid, values, strict=True))
        if "block_k_warps" in cfg:
            cfg["block_k"], cfg["num_warps"] = cfg.pop("block_k_warps")
        launches.append(cfg)
    return launches


def _w4_copies(k: int, n: int, group: int, gen: Any) -> list[tuple[Any, Any, Any]]:
    """Random 4-bit layers in the GEMV's layout, enough copies to miss L2: [(qweight [K/8, N] int32,
    scales [G, N], zeros [G, N])]."""
    import torch

    return [
        (
            torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda", generator=gen),
            (torch.rand(k // group, n, device="cuda", generator=gen) * 1e-3).half(),
            torch.full((k // group, n), 8.0, device="cuda").half(),
        )
        for _ in range(copies_past_l2(k * n // 2))
    ]


def _fp8_copies(k: int, n: int, gen: Any) -> list[tuple[Any, Any]]:
    """Random FP8 layers, enough copies to miss L2: [(weight [N, K] float8, scale [N])]."""
    import torch

    from engine.model.quantization.fp8 import quantize_per_channel

    return [
        quantize_per_channel(torch.randn(n, k, device="cuda", generator=gen))
        for _ in range(copies_past_l2(k * n))
    ]


def sweep_shape(
    name: str,
    k: int,
    n: int,
    bandwidth: float,
    ms: tuple[int, ...],
    kinds: frozenset[str] = KINDS,
    max_shared_kb: int | None = None,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from ops.triton.fp8_gemv import fp8_gemv

    group = 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    w4 = _w4_copies(k, n, group, gen) if kinds & {"w4", "w4h"} else []
    fp8 = _fp8_copies(k, n, gen) if "fp8" in kinds else []
    dense = [
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(copies_past_l2(k * n * 2))
    ]  # [N, K]: torch.nn.Linear's layout, as the engine holds unquantized weights
    ones = torch.ones(n, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result: dict[str, Any] = {"k": k, "n": n, "group_size": group}
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        row: dict[str, Any] = {}
        bf16_ms = graph_ms([functools.partial(F.linear, x, w) for w in dense])
        row["bf16"] = {"us": round(bf16_ms * 1e3, 2), "bw": round(k * n * 2 / (bf16_ms / 1e3) / bandwidth, 3)}
        # the float-weight GEMV on bf16 weights (unit scales), against cuBLAS above
        if m in BF16_GRIDS and "bf16" in kinds:
            ref = F.linear(x.float(), dense[0].float())
            row["bf16_gemv"] = []
            for cfg in _grid(BF16_GRIDS[m]):
                err = rel_err(fp8_gemv(x, dense[0], ones, **cfg), ref)
                t = graph_ms([functools.partial(fp8_gemv, x, w, ones, **cfg) for w in dense])
                row["bf16_gemv"].append({**cfg, "us": round(t * 1e3, 2),
                                         "bw": round(k * n * 2 / (t / 1e3) / bandwidth, 3), "err": round(err, 5)})  # fmt: skip
        if "skinny" in kinds and m >= 2:
            _sweep_skinny(row, x, dense, k, n, bandwidth, max_shared_kb)
        w4_bytes = k * n // 2 + 2 * (k // group) * n * 2
        if "w4" in kinds:
            _sweep_w4(row, x, w4, group, m, k, n, sms, bandwidth, w4_bytes)
        if "w4h" in kinds and m in W4H_GRIDS:
            _sweep_w4h(row, x, w4, group, m, name == "gate_up", bandwidth, w4_bytes)
        if "fp8" in kinds:
            _sweep_fp8(row, x, fp8, m, k, n, bandwidth, skinny="skinny" in kinds)
        if "gated" in kinds and name == "gate_up" and m <= 2:
            row["gated"] = _sweep_gated(x, k, n, group, sms, gen)
        for key in ("w4_gemv", "w4h_gemv", "w4h_gated", "fp8_gemv", "bf16_gemv", "skinny", "fp8_skinny"):
            if key not in row:
                continue
            good = [r for r in row[key] if r["err"] < 2e-2]
            row[f"{key}_best"] = min(good, key=lambda r: r["us"]) if good else None
            row[f"{key}_wrong"] = [r for r in row[key] if r["err"] >= 2e-2]
        result[f"m{m}"] = row
        print(
            f"[sweep] {name} {k}x{n} m={m}: bf16 {row['bf16']} dot {row.get('w4_dot_plan')} "
            f"w4 {row.get('w4_gemv_best')} w4h {row.get('w4h_gemv_best')} w4h_gated {row.get('w4h_gated_best')} fp8 {row.get('fp8_gemv_best')} fp8_mm {row.get('fp8_scaled_mm')} "
            f"bf16_gemv {row.get('bf16_gemv_best')} skinny {row.get('skinny_best')} fp8_skinny {row.get('fp8_skinny_best')} gated {row.get('gated')} "
            f"wrong {sum(len(row.get(f'{key}_wrong', [])) for key in ('w4_gemv', 'w4h_gemv', 'w4h_gated', 'fp8_gemv', 'bf16_gemv', 'skinny', 'fp8_skinny'))}",
            flush=True,
        )
    del w4, fp8, dense
    torch.cuda.empty_cache()
    return result


def _skinny_shared_estimate(cfg: dict[str, int]) -> int:
    """Bytes of shared memory a skinny launch's pipeline holds: num_stages weight and x tiles (bf16)."""
    return (cfg["block_n"] + 16) * cfg["block_k"] * 2 * cfg["num_stages"]


def _sweep_skinny(
    row: dict[str, Any],
    x: Any,
    dense: list,
    k: int,
    n: int,
    bandwidth: float,
    max_shared_kb: int | None = None,
) -> None:
    """The skinny GEMM's grid on the bf16 weights' copies, into `row` (against cuBLAS's row["bf16"]);
    with max_shared_kb, SKINNY_SMALL_GRID's launches under that much shared memory (as compiled)."""
    import torch.nn.functional as F

    from ops.triton.skinny_gemm import SHARED_BYTES, skinny_gemm

    ref = F.linear(x.float(), dense[0].float())
    row["skinny"] = []
    grid = _grid(SKINNY_GRID) if max_shared_kb is None else [
        cfg for cfg in _grid(SKINNY_SMALL_GRID) if _skinny_shared_estimate(cfg) < max_shared_kb * 1024
    ]  # fmt: skip
    for cfg in grid:
        try:  # a wide tile with many stages can want more shared memory than the card has
            err = rel_err(skinny_gemm(x, dense[0], **cfg), ref)
        except Exception as e:  # noqa: BLE001 (triton's OutOfResources and its kin: skip the launch)
            print(f"[sweep] skinny {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        shared = SHARED_BYTES.get(
            (cfg["block_n"], cfg["block_k"], cfg["split_k"] > 1, cfg["num_stages"], False)
        )
        if max_shared_kb is not None and shared is not None and shared > max_shared_kb * 1024:
            print(
                f"[sweep] skinny {cfg}: {shared} bytes of shared memory, over {max_shared_kb} KB", flush=True
            )
            continue
        t = graph_ms([functools.partial(skinny_gemm, x, w, **cfg) for w in dense])
        row["skinny"].append({**cfg, "us": round(t * 1e3, 2), "bw": round(k * n * 2 / (t / 1e3) / bandwidth, 3),
                              "err": round(err, 5), "shared_bytes": shared})  # fmt: skip


def _sweep_w4(row: dict[str, Any], x: Any, w4: list, group: int, m: int, k: int, n: int, sms: int,
              bandwidth: float, w4_bytes: int) -> None:  # fmt: skip
    """The W4A16 dot kernel's planned launch and the GEMV's grid on `w4`'s copies, into `row`."""
    import torch

    from engine.model.quantization.wna16 import plan_wna16
    from ops.triton.wna16_gemm import wna16_dequantize, wna16_gemm
    from ops.triton.wna16_gemv import wna16_gemv

    ref_w4 = x.float() @ wna16_dequantize(*w4[0], 4, group, torch.float32)
    plan = plan_wna16(m, k, n, group, sms)
    launch = (plan.block_m, plan.block_n, plan.block_k, plan.split_k, plan.num_warps, plan.num_stages)
    dot_ms = graph_ms([functools.partial(wna16_gemm, x, *q, 4, group, *launch) for q in w4])
    row["w4_dot_plan"] = {"us": round(dot_ms * 1e3, 2), "bw": round(w4_bytes / (dot_ms / 1e3) / bandwidth, 3)}
    row["w4_gemv"] = []
    for cfg in _grid(W4_GRIDS[m]):
        err = rel_err(wna16_gemv(x, *w4[0], 4, group, **cfg), ref_w4)
        t = graph_ms([functools.partial(wna16_gemv, x, *q, 4, group, **cfg) for q in w4])
        row["w4_gemv"].append({**cfg, "us": round(t * 1e3, 2), "bw": round(w4_bytes / (t / 1e3) / bandwidth, 3),
                               "err": round(err, 5)})  # fmt: skip


def _sweep_w4h(row: dict[str, Any], x: Any, w4: list, group: int, m: int, gated: bool, bandwidth: float,
               w4_bytes: int) -> None:  # fmt: skip
    """The packed-fp16 W4A16 GEMV's grid on `w4`'s copies, into `row`; for a [gate; up] layer also
    with silu(gate) * up in its epilogue (error against F.linear then SiLU-mul)."""
    import torch
    import torch.nn.functional as F

    from ops.triton.w4_half2_gemv import w4_half2_gemv
    from ops.triton.wna16_gemm import wna16_dequantize

    ref = x.float() @ wna16_dequantize(*w4[0], 4, group, torch.float32)  # [M, N]
    half = ref.shape[1] // 2
    ref_gated = F.silu(ref[:, :half]) * ref[:, half:]
    for key, ref_out, flag in (("w4h_gemv", ref, False), ("w4h_gated", ref_gated, True)):
        if flag and not gated:
            continue
        row[key] = []
        for cfg in _grid(W4H_GRIDS[m]):
            err = rel_err(w4_half2_gemv(x, *w4[0], group, **cfg, gated=flag), ref_out)
            t = graph_ms([functools.partial(w4_half2_gemv, x, *q, group, **cfg, gated=flag) for q in w4])
            row[key].append({**cfg, "us": round(t * 1e3, 2), "bw": round(w4_bytes / (t / 1e3) / bandwidth, 3),
                             "err": round(err, 5)})  # fmt: skip


def _sweep_fp8(
    row: dict[str, Any], x: Any, fp8: list, m: int, k: int, n: int, bandwidth: float, skinny: bool = False
) -> None:
    """torch._scaled_mm (W8A8) and the FP8 GEMV's grid on `fp8`'s copies, into `row`; with `skinny` the
    skinny GEMM's FP8 grid too."""
    from engine.model.quantization.fp8 import _scaled_mm_linear
    from ops.triton.fp8_gemv import fp8_gemv

    ref_fp8 = x.float() @ (fp8[0][0].float() * fp8[0][1][:, None]).t()
    mm_ms = graph_ms([functools.partial(_scaled_mm_linear, x, w, s, None) for w, s in fp8])
    row["fp8_scaled_mm"] = {"us": round(mm_ms * 1e3, 2), "bw": round(k * n / (mm_ms / 1e3) / bandwidth, 3)}
    row["fp8_gemv"] = []
    for cfg in _grid(FP8_GRIDS[m]) + (_grid(FP8_STAGED_GRID) if m == 1 else []):
        err = rel_err(fp8_gemv(x, *fp8[0], **cfg), ref_fp8)
        t = graph_ms([functools.partial(fp8_gemv, x, w, s, **cfg) for w, s in fp8])
        row["fp8_gemv"].append({**cfg, "us": round(t * 1e3, 2), "bw": round(k * n / (t / 1e3) / bandwidth, 3),
                                "err": round(err, 5)})  # fmt: skip
    if skinny:  # the tensor-core skinny GEMM on the same FP8 weights (W8A16), every token count
        from ops.triton.skinny_gemm import skinny_gemm

        row["fp8_skinny"] = []
        for cfg in _grid(FP8_SKINNY_GRID):
            try:
                err = rel_err(skinny_gemm(x, *fp8[0], **cfg), ref_fp8)
            except Exception as e:  # noqa: BLE001 (a launch the card cannot hold: skipped)
                print(f"[sweep] fp8 skinny {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            t = graph_ms([functools.partial(skinny_gemm, x, w, s, **cfg) for w, s in fp8])
            row["fp8_skinny"].append({**cfg, "us": round(t * 1e3, 2), "bw": round(k * n / (t / 1e3) / bandwidth, 3),
                                      "err": round(err, 5)})  # fmt: skip


def _sweep_gated(x: Any, k: int, n: int, group: int, sms: int, gen: Any) -> dict[str, Any]:
    """The gate_up projection with silu(gate) * up in the GEMV's epilogue (the engine's decode path,
    at the planned launches) against the plain GEMV followed by the SiLU-mul kernel: microseconds of
    both, and the gated output's error against F.linear then SiLU-mul in float32."""
    import torch
    import torch.nn.functional as F

    from engine.model.quantization.float_gemv import plan_float_gemv, plan_gated_gemv
    from engine.model.quantization.fp8 import fp8_gemv_launch
    from engine.model.quantization.wna16 import plan_wna16, run_wna16_gemv
    from ops.triton.activation import silu_and_mul
    from ops.triton.fp8_gemv import fp8_gemv
    from ops.triton.wna16_gemm import wna16_dequantize

    m, half = x.shape[0], n // 2

    def reference(dense: Any) -> Any:  # dense [N, K] float32
        y = F.linear(x.float(), dense)
        return F.silu(y[:, :half]) * y[:, half:]

    out: dict[str, Any] = {}
    cases = []
    if m == 1:
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
                 for _ in range(copies_past_l2(k * n * 2))]  # fmt: skip
        ones = torch.ones(n, device="cuda")
        plain = plan_float_gemv(k, n) or plan_gated_gemv(k, n)
        gated = plan_gated_gemv(k, n)
        if gated is not None:
            cases.append(("bf16", [functools.partial(fp8_gemv, x, w, ones, None, **gated, gated=True) for w in dense],
                          [functools.partial(lambda w: silu_and_mul(fp8_gemv(x, w, ones, None, **plain)), w)
                           for w in dense], reference(dense[0].float())))  # fmt: skip
    fp8 = _fp8_copies(k, n, gen)
    launch = fp8_gemv_launch(k, n, sms, m)
    cases.append(("fp8", [functools.partial(fp8_gemv, x, w, s, None, **launch, gated=True) for w, s in fp8],
                  [functools.partial(lambda w, s: silu_and_mul(fp8_gemv(x, w, s, None, **launch)), w, s) for w, s in fp8],
                  reference(fp8[0][0].float() * fp8[0][1][:, None])))  # fmt: skip
    del fp8
    w4 = _w4_copies(k, n, group, gen)
    p = plan_wna16(m, k, n, group, sms)  # the engine's launch and kernel (integer zero points, bf16 x)
    cases.append(("w4", [functools.partial(run_wna16_gemv, x, *q, 4, group, p, True) for q in w4],
                  [functools.partial(lambda q: silu_and_mul(run_wna16_gemv(x, *q, 4, group, p)), q) for q in w4],
                  reference(wna16_dequantize(*w4[0], 4, group, torch.float32).t().contiguous())))  # fmt: skip
    for name, gated_fns, plain_fns, ref in cases:
        out[name] = {
            "err": round(rel_err(gated_fns[0](), ref), 5),
            "gated_us": round(graph_ms(gated_fns) * 1e3, 2),
            "plain_then_silu_mul_us": round(graph_ms(plain_fns) * 1e3, 2),
        }
    return out


def skinny_launches(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{"KxN": launch} for each shape where one skinny GEMM launch beats cuBLAS summed over the swept
    batches (the launch with the least total time), the form WEIR_SKINNY_GEMM_LAUNCHES reads."""
    chosen = {}
    for row in report.values():
        if not isinstance(row, dict) or "k" not in row:
            continue
        batches = [b for key, b in row.items() if key.startswith("m") and "skinny" in b]
        if not batches:
            continue
        totals: dict[tuple[tuple[str, int], ...], float] = {}
        for b in batches:
            for r in b["skinny"]:
                launch = tuple((name, r[name]) for name in SKINNY_GRID)
                ok = r["err"] < 2e-2
                totals[launch] = totals.get(launch, 0.0) + (r["us"] if ok else float("inf"))
        best = min(totals, key=totals.__getitem__)
        if totals[best] < sum(b["bf16"]["us"] for b in batches):
            chosen[f"{row['k']}x{row['n']}"] = dict(best)
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--batches", default="1,2,4,8,16", help="token counts to sweep (of 1, 2, 4, 8, 16)")
    p.add_argument(
        "--kinds", default=",".join(sorted(KINDS)), help="kernels to sweep, of " + ",".join(sorted(KINDS))
    )
    p.add_argument("--out", default=None)
    p.add_argument(
        "--skinny-launches-out",
        default=None,
        help="write the skinny GEMM's winning launches here, as WEIR_SKINNY_GEMM_LAUNCHES reads them",
    )
    p.add_argument(
        "--skinny-max-shared-kb",
        type=int,
        default=None,
        help="sweep the skinny GEMM's small-tile grid, launches under this much shared memory only",
    )
    args = p.parse_args(argv)
    kinds = frozenset(args.kinds.split(","))
    if not kinds <= KINDS:
        p.error(f"--kinds: {sorted(kinds - KINDS)} not among {sorted(KINDS)}")
    import torch

    from loadtest.common import measure_copy_bandwidth

    config = SHAPES[args.shape]
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes = {"qkv": (h, h + 2 * kv), "o": (h, h), "gate_up": (h, 2 * inter), "down": (inter, h)}
    bandwidth = measure_copy_bandwidth("cuda")["bytes_per_s"]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "copy_bandwidth_gbs": round(bandwidth / 1e9),
                              "shape": args.shape}  # fmt: skip
    ms = tuple(int(b) for b in args.batches.split(","))
    for name, (k, n) in shapes.items():
        report[name] = sweep_shape(name, k, n, bandwidth, ms, kinds, args.skinny_max_shared_kb)
        if args.out:  # after every shape: a call that runs out of time keeps what it measured
            Path(args.out).write_text(json.dumps(report, indent=1))
    if args.skinny_launches_out:
        launches = skinny_launches(report)
        print(f"[sweep] skinny launches that beat cuBLAS: {launches}", flush=True)
        Path(args.skinny_launches_out).write_text(json.dumps(launches, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
