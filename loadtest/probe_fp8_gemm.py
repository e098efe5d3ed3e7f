"""Where Q3's FP8 GEMMs stand: torch._scaled_mm at a model's four linear shapes and prefill/decode row
counts, with the scaling weir uses and the alternatives, against bf16 F.linear, in one GPU call.

Q3 (FP8 weights' T2 throughput, issue 12) is mostly prefill: of a 1,024-in / 128-out request's step
time ~70% is 8,192-token prefill steps, whose FP8 GEMMs ran at 1,342 TFLOP/s on an H200 (the proffp8
profile, 3ef2c5a) with row-wise scales on both sides (a per-token activation scale, a per-channel
weight scale: cuBLASLt's outer-vector scaling). This measures, per shape and row count:
- `bf16`: F.linear on bf16 weights (cuBLAS), the baseline;
- `rowwise`: weir's W8A8 GEMM (per-token x scales [M, 1], per-channel weight scales [1, N]);
- `rowwise_fast`: the same with use_fast_accum (FP8 accumulation without periodic promotion: faster on
  Hopper, less exact over long K);
- `tensorwise`: one scale a side (what a per-tensor dynamic or static activation scale allows);
- `tensorwise_fast`;
- `quant`: the per-token activation quantizer's launch (ops/triton/fp8_quant.py) on x, on CUDA;
each as TFLOP/s, time and ratio to bf16, and every FP8 output's error against bf16 on the
dequantized operands (so a fast variant that is wrong shows it).

    python loadtest/probe_fp8_gemm.py --shape llama3-8b --rows 256,2048,8192 --out fp8_gemm.json
    python loadtest/probe_fp8_gemm.py --smoke      # CPU: tiny shapes, the plumbing only (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from loadtest.gpu_timing import back_to_back_ms  # noqa: E402
from loadtest.model_shapes import SHAPES  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def linear_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of the shape's decoder linears (q/k/v and gate/up fused)."""
    cfg = SHAPES[shape]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    return {"qkv": (h, h + 2 * kv), "o": (h, h), "gate_up": (h, 2 * inter), "down": (inter, h)}


def per_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], scale [M, 1] float32): ops.reference.per_token_fp8's arithmetic."""
    from ops import reference  # noqa: PLC0415

    return reference.per_token_fp8(x)


def probe_shape(
    in_f: int, out_f: int, rows: int, device: torch.device, calls: int, reps: int
) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(rows * 7 + in_f + out_f)
    x = (torch.randn(rows, in_f, generator=gen) * 0.5).to(device, torch.bfloat16)  # [M, K]
    w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(device, torch.bfloat16)  # [N, K]
    w_scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX  # [N] per channel
    wq = (w.float() / w_scale[:, None]).to(FP8)  # [N, K]
    xq, x_scale = per_token_quant(x)  # [M, K] fp8, [M, 1]
    # one scale a side: the per-channel / per-token scales' largest (values re-rounded to it)
    w_scale_t = w_scale.max().reshape(())
    wq_t = (wq.float() * w_scale[:, None] / w_scale_t).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    x_scale_t = x_scale.max().reshape(())
    xq_t = (xq.float() * x_scale / x_scale_t).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    flop = 2.0 * rows * in_f * out_f

    def scaled(
        a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, fast: bool
    ) -> torch.Tensor:
        return torch._scaled_mm(
            a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast
        )

    ws_row = w_scale.view(1, -1)  # [1, N]
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "bf16": lambda: torch.nn.functional.linear(x, w),
        "rowwise": lambda: scaled(xq, x_scale, wq, ws_row, False),
        "rowwise_fast": lambda: scaled(xq, x_scale, wq, ws_row, True),
        "tensorwise": lambda: scaled(xq_t, x_scale_t, wq_t, w_scale_t, False),
        "tensorwise_fast": lambda: scaled(xq_t, x_scale_t, wq_t, w_scale_t, True),
    }
    reference = torch.nn.functional.linear(x.float(), w.float())  # [M, N] float32, unquantized
    result: dict[str, Any] = {"rows": rows, "in": in_f, "out": out_f}
    for name, fn in variants.items():
        try:
            out = fn()
            ms = back_to_back_ms(fn, device, calls, reps)
        except (RuntimeError, NotImplementedError) as exc:  # a scaling this torch / card lacks
            result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        err = ((out.float() - reference).norm() / reference.norm()).item()
        result[name] = {"ms": round(ms, 4), "tflop_s": round(flop / ms / 1e9, 1), "rel_err": round(err, 5)}
    base = result["bf16"].get("ms")
    for name in variants:
        if name != "bf16" and "ms" in result[name] and base:
            result[name]["vs_bf16"] = round(base / result[name]["ms"], 3)
    if device.type == "cuda":
        try:
            from engine.model.quantization.fp8 import _per_token_fp8  # noqa: PLC0415

            result["quant"] = {
                "ms": round(back_to_back_ms(lambda: _per_token_fp8(x), device, calls, reps), 4)
            }
        except Exception as exc:  # noqa: BLE001 - reported with the figures, the GEMMs still count
            result["quant"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--rows", default="256,2048,8192", help="row counts (tokens a step), comma-separated")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the plumbing only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        device, shapes, rows, calls, reps = torch.device("cpu"), {"tiny": (64, 96)}, [16], 1, 1
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        device, shapes, calls, reps = torch.device("cuda"), linear_shapes(args.shape), args.calls, args.reps
        rows = [int(r) for r in args.rows.split(",")]
    report: dict[str, Any] = {
        "benchmark": "fp8_gemm_probe",
        "shape": "tiny" if args.smoke else args.shape,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "results": {},
    }
    for name, (in_f, out_f) in shapes.items():
        for m in rows:
            r = probe_shape(in_f, out_f, m, device, calls, reps)
            report["results"][f"{name} m={m}"] = r
            line = " ".join(
                f"{k} {v['tflop_s']} TF/s ({v.get('vs_bf16', 1.0)}x, err {v['rel_err']})"
                if "tflop_s" in v
                else f"{k} {v}"
                for k, v in r.items()
                if isinstance(v, dict)
            )
            print(f"[fp8 gemm] {name} {in_f}x{out_f} m={m}: {line}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
