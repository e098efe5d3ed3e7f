"""WEIR_FOLD_NORM at the kernel level: the one-token RMSNorm + GEMV (two launches, as the decode step runs them
by default) against the GEMV with the norm folded in (ops/triton/fp8_gemv.py with `norm`), on Llama-3-8B's two
projections after a norm (qkv, and gate_up as its gated launch), FP8 and bf16 weights, at the engine's planned
launches and a few wider tiles (the fold reads x, the residual and the norm weight once more per program: fewer
programs, fewer of those reads), and the one-pass fold (`norm_one_pass`: the row read once, the sums scaled by
1 / rms, the norm's roundings not made). CUDA-graph replays cycling weight copies past L2 (loadtest/gpu_timing.py).

    python loadtest/probe_folded_norm.py --out fold.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.gpu_timing import copies_past_l2, graph_ms, rel_err  # noqa: E402

HIDDEN = 4096
SHAPES = {"qkv": 6144, "gate_up": 2 * 14336}  # out features (Llama-3-8B)
WIDER = ({"block_n": 8}, {"block_n": 16})  # over the planned launch


def _planned(kind: str, name: str, n: int) -> dict[str, Any]:
    from engine.model.quantization.float_gemv import plan_float_gemv, plan_gated_gemv
    from engine.model.quantization.fp8 import fp8_gemv_launch

    gated = name == "gate_up"
    if kind == "fp8":
        return {**fp8_gemv_launch(HIDDEN, n, 132, 1), "gated": gated}
    launch = plan_gated_gemv(HIDDEN, n) if gated else plan_float_gemv(HIDDEN, n)
    return {**launch, "gated": gated}


def probe(kind: str, name: str, n: int) -> dict[str, Any]:
    import torch

    from ops.folded_norm import ResidualNorm
    from ops.triton.fp8_gemv import fp8_gemv
    from ops.triton.rms_norm import rms_norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    bytes_per = HIDDEN * n * (1 if kind == "fp8" else 2)
    copies = []
    for _ in range(copies_past_l2(bytes_per)):
        w = torch.randn(n, HIDDEN, device="cuda", generator=gen)
        if kind == "fp8":
            copies.append(
                ((w * 50).clamp(-448, 448).to(torch.float8_e4m3fn), torch.rand(n, device="cuda") * 1e-2)
            )
        else:
            copies.append(((w * 0.02).bfloat16(), torch.ones(n, device="cuda")))
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    residual = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = (torch.rand(HIDDEN, device="cuda", generator=gen) + 0.5).bfloat16()
    new_residual = torch.empty_like(x)

    def two_launches(w: Any, s: Any, launch: dict[str, Any]) -> Any:
        normed, _ = rms_norm(x, g, 1e-5, residual)
        return fp8_gemv(normed, w, s, **launch)

    def folded(w: Any, s: Any, launch: dict[str, Any]) -> Any:
        return fp8_gemv(x, w, s, **launch, norm=ResidualNorm(residual, g, 1e-5, new_residual))

    planned = _planned(kind, name, n)
    base_us = graph_ms([functools.partial(two_launches, w, s, planned) for w, s in copies]) * 1e3
    gemv_only_us = graph_ms([functools.partial(fp8_gemv, x, w, s, **planned) for w, s in copies]) * 1e3
    ref = two_launches(*copies[0], planned).float()
    rows = []
    for change in ({}, *WIDER, {"norm_one_pass": True}, {"norm_one_pass": True, "block_n": 8}):
        launch = {**planned, **change}
        err = rel_err(folded(*copies[0], launch).float(), ref)
        us = graph_ms([functools.partial(folded, w, s, launch) for w, s in copies]) * 1e3
        rows.append({**launch, "us": round(us, 2), "err": round(err, 6)})
    out = {
        "kind": kind, "layer": name, "n": n, "planned": planned,
        "norm_then_gemv_us": round(base_us, 2), "gemv_alone_us": round(gemv_only_us, 2), "folded": rows,
    }  # fmt: skip
    print(f"[fold] {kind} {name}: norm+gemv {base_us:.2f} us, gemv {gemv_only_us:.2f}, folded "
          + ", ".join(f"bn{r['block_n']}{' 1-pass' if r.get('norm_one_pass') else ''} {r['us']} (err {r['err']})"
                      for r in rows), flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import torch

    report = {"device": torch.cuda.get_device_name(0), "results": []}
    for kind in ("fp8", "bf16"):
        for name, n in SHAPES.items():
            report["results"].append(probe(kind, name, n))
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
