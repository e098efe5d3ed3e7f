"""Is PyTorch's own 4-bit kernel faster than weir's W4A16 GEMV? `torch._weight_int4pack_mm` (tinygemm, in
every CUDA build of torch since 2.2; bf16 activations, groups of 32-256, w = (q - 8) * scale + zero with
bf16 scales and zeros) timed beside weir's planned launch (engine.model.quantization.wna16: the folded
GEMV at 1-4 tokens, the W4A16 GEMM at 5-16) on the same codes, at a model's four linear shapes, in one
GPU call.

    python loadtest/probe_tinygemm.py --shape llama3-8b --batches 1,2,4,8,16 --out tinygemm.json

GPTQ's w = (q - z) * s becomes tinygemm's with zero = (8 - z) * s; both scale and zero are rounded to bf16
(tinygemm takes no fp16 metadata), so its error against the fp32 reference is reported next to weir's.
Timing as peer_w4_gemv.py (loadtest/gpu_timing.py: CUDA-graph replays cycling through enough weight copies
to miss L2; bytes read over the copy bandwidth measured in the same call). tinygemm runs at each
`inner_k_tiles` it takes (2, 4, 8: how many 16-deep K tiles one packed row interleaves).
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
INNER_K_TILES = (2, 4, 8)


def tinygemm_weights(qweight: Any, scales: Any, zeros: Any, inner_k_tiles: int) -> tuple[Any, Any]:
    """GPTQ's layout (qweight [K/8, N] int32, scales and integer zero points [G, N] fp16) as tinygemm's:
    (packed int4 words from torch._convert_weight_to_int4pack, scales_and_zeros [G, N, 2] bf16)."""
    import torch

    from engine.model.quantization.packing import unpack_rows

    codes = unpack_rows(qweight, 4).t().to(torch.int32)  # [N, K], 0..15
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # [N, K / 2]: even k in the high nibble
    packed = torch._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)
    s = scales.float()
    scale_zero = torch.stack([s, (8.0 - zeros.float()) * s], dim=-1)  # [G, N, 2]
    return packed, scale_zero.to(torch.bfloat16).contiguous()


def skinny_launches(k: int, n: int, sms: int, tokens: int = 8) -> list[dict]:
    """w4_skinny_gemm launches to time at a shape: the planned one (engine.model.quantization.wna16.plan_w4_skinny,
    from the sweeps at a444954, df19e93, 53c574b and a9e7b3d; at 1-2 tokens the 8-token plan), the same with
    256-deep tiles (two groups a tile) at its split, half of it and on 8 warps, and with the exact tile."""
    from engine.model.quantization.wna16 import plan_w4_skinny

    plan = plan_w4_skinny(tokens, k, n, GROUP, sms) or plan_w4_skinny(8, k, n, GROUP, sms)
    base = {"block_n": plan.block_n, "split_k": plan.split_k, "num_stages": plan.num_stages, "scaled": plan.scaled,
            "block_m": plan.block_m}  # fmt: skip
    return [
        base,  # what the engine runs
        {**base, "block_k": 256},  # tiles over two groups: half the iterations
        {**base, "block_k": 256, "split_k": max(1, plan.split_k // 2)},
        {**base, "block_k": 256, "num_warps": 8},
        {**base, "scaled": False},  # every product exact, the scale on each tile's sums
    ]


def compare_shape(
    k: int, n: int, tokens: int, bandwidth: float, sms: int, gated: bool = False, tinygemm: bool = True
) -> dict:
    import torch
    import torch.nn.functional as F

    from engine.model.quantization.wna16 import plan_wna16, run_wna16_gemv
    from loadtest.gpu_timing import copies_past_l2
    from ops.triton.w4_skinny_gemm import w4_skinny_gemm
    from ops.triton.wna16_gemm import wna16_dequantize, wna16_gemm

    gen = torch.Generator(device="cuda").manual_seed(0)
    copies = [
        (
            torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda", generator=gen),
            (torch.rand(k // GROUP, n, device="cuda", generator=gen) * 1e-3 + 1e-4).half(),
            torch.randint(0, 16, (k // GROUP, n), device="cuda", generator=gen).half(),
        )
        for _ in range(copies_past_l2(k * n // 2))
    ]
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = x.float() @ wna16_dequantize(*copies[0], 4, GROUP, torch.float32)  # [M, N]
    nbytes = k * n // 2 + 2 * (k // GROUP) * n * 2
    row: dict[str, Any] = {"k": k, "n": n, "tokens": tokens, "bytes": nbytes}

    timed = kernel_timer(row, ref, nbytes, bandwidth, f"[tinygemm] {k}x{n} m={tokens}")

    plan = plan_wna16(tokens, k, n, GROUP, sms)
    row["weir_launch"] = repr(plan)
    if plan.path == "gemm":
        args = (plan.block_m, plan.block_n, plan.block_k, plan.split_k, plan.num_warps, plan.num_stages)
        timed("weir", [functools.partial(wna16_gemm, x, *q, 4, GROUP, *args) for q in copies],
              wna16_gemm(x, *copies[0], 4, GROUP, *args))  # fmt: skip
    else:
        timed("weir", [functools.partial(run_wna16_gemv, x, *q, 4, GROUP, plan) for q in copies],
              run_wna16_gemv(x, *copies[0], 4, GROUP, plan))  # fmt: skip
        if gated:  # what the engine runs for [gate; up] at decode: silu(gate) * up stored by the GEMV
            fn = functools.partial(run_wna16_gemv, group_size=GROUP, launch=plan, gated=True)
            timed("weir_gated", [functools.partial(fn, x, *q, 4) for q in copies], fn(x, *copies[0], 4),
                  expected=F.silu(ref[:, : n // 2]) * ref[:, n // 2 :])  # fmt: skip
    for launch in skinny_launches(
        k, n, sms, tokens
    ):  # the tensor-core W4A16 GEMM (ops/triton/w4_skinny_gemm.py)
        name = "skinny_" + "_".join(f"{key}{value}" for key, value in launch.items())
        try:
            fn = functools.partial(w4_skinny_gemm, group_size=GROUP, **launch)
            timed(name, [functools.partial(fn, x, *q) for q in copies], fn(x, *copies[0]))
        except Exception as e:  # noqa: BLE001 (a launch the shape cannot take: reported, the rest go on)
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[tinygemm] {k}x{n} {name} failed: {row[name]}", flush=True)
    for tiles in INNER_K_TILES if tinygemm else ():
        try:
            packed = [tinygemm_weights(*q, tiles) for q in copies]
            fns = [functools.partial(torch._weight_int4pack_mm, x, p, GROUP, sz) for p, sz in packed]
            timed(f"tinygemm_ikt{tiles}", fns, fns[0]())
            del packed, fns
        except Exception as e:  # noqa: BLE001 (a layout this torch refuses: reported, the rest go on)
            row[f"tinygemm_ikt{tiles}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[tinygemm] {k}x{n} ikt{tiles} failed: {row[f'tinygemm_ikt{tiles}']}", flush=True)
    del copies
    dense = [
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(copies_past_l2(k * n * 2))
    ]
    timed("bf16", [functools.partial(F.linear, x, w) for w in dense], F.linear(x, dense[0]),
          expected=F.linear(x.float(), dense[0].float()), bytes_read=k * n * 2)  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--no-tinygemm", action="store_true", help="time weir's launches and bf16 only")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    from loadtest.common import measure_copy_bandwidth
    from loadtest.probe_fp8_gemm import linear_shapes

    bandwidth = measure_copy_bandwidth("cuda")["bytes_per_s"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "copy_bandwidth_gbs": round(bandwidth / 1e9), "shape": args.shape}  # fmt: skip
    for tokens in (int(b) for b in args.batches.split(",")):
        for name, (k, n) in linear_shapes(args.shape).items():
            report[f"{name}_m{tokens}"] = compare_shape(
                k, n, tokens, bandwidth, sms, gated=name == "gate_up", tinygemm=not args.no_tinygemm
            )
            if args.out:  # after every shape: a call cut short keeps what it measured
                Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
