"""How fast can a W4A16 GEMV's weight bytes be read at all? A streaming probe (no decode, no x): the
packed words of Llama-3-8B's four projections read in the GEMV's tiles and XOR-folded, in the layout
the kernels use today (`qweight` [K / 8, N], N contiguous: column tiles of 256 B-1 KB runs per word
row) and transposed ([N, K / 8], K contiguous: each output row's words one run, as the FP8 and bf16
GEMVs read their weights), against a flat read of the same bytes. If the column-tile read alone stays
near the GEMV's time (0.55-0.57 of the copy bandwidth on gate_up, 2026-12-04), the layout, not the
decode, is the limit.

    python loadtest/probe_w4_layout.py --out probe.json     (CUDA only)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.gpu_timing import copies_past_l2, graph_ms  # noqa: E402


@triton.jit
def _columns_kernel(w_ptr, out_ptr, KW, N, kw_per_split, WORDS: tl.constexpr, BLOCK_N: tl.constexpr):
    """w [KW, N] int32 read in [WORDS, BLOCK_N] tiles down one column block's K split."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.int32)
    start = pid_k * kw_per_split
    for kw in range(start, tl.minimum(start + kw_per_split, KW), WORDS):
        acc ^= tl.load(
            w_ptr + (kw + offs_w)[:, None] * N + offs_n[None, :], mask=(kw + offs_w)[:, None] < KW, other=0
        )
    tl.store(out_ptr + pid_k * N + offs_n, tl.reduce(acc, 0, _xor))


@triton.jit
def _rows_kernel(w_ptr, out_ptr, KW, N, kw_per_split, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr):
    """w [N, KW] int32 read in [BLOCK_N, BLOCK_KW] tiles along BLOCK_N rows' K split."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_KW)
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.int32)
    start = pid_k * kw_per_split
    for kw in range(start, tl.minimum(start + kw_per_split, KW), BLOCK_KW):
        acc ^= tl.load(
            w_ptr + offs_n[:, None] * KW + (kw + offs_k)[None, :], mask=(kw + offs_k)[None, :] < KW, other=0
        )
    tl.store(out_ptr + pid_k * N + offs_n, tl.reduce(acc, 1, _xor))


@triton.jit
def _flat_kernel(w_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(
        out_ptr + tl.program_id(0), tl.reduce(tl.load(w_ptr + offs, mask=offs < numel, other=0), 0, _xor)
    )


@triton.jit
def _xor(a, b):
    return a ^ b


def _launch_columns(w: Any, out: Any, words: int, block_n: int, split: int, warps: int) -> None:
    kw, n = w.shape
    per = triton.cdiv(triton.cdiv(kw, split), words) * words
    _columns_kernel[(n // block_n, triton.cdiv(kw, per))](w, out, kw, n, per, WORDS=words, BLOCK_N=block_n,
                                                          num_warps=warps)  # fmt: skip


def _launch_rows(w: Any, out: Any, block_kw: int, block_n: int, split: int, warps: int) -> None:
    n, kw = w.shape
    per = triton.cdiv(triton.cdiv(kw, split), block_kw) * block_kw
    _rows_kernel[(n // block_n, triton.cdiv(kw, per))](w, out, kw, n, per, BLOCK_KW=block_kw, BLOCK_N=block_n,
                                                       num_warps=warps)  # fmt: skip


def _launch_flat(w: Any, out: Any, block: int) -> None:
    _flat_kernel[(triton.cdiv(w.numel(), block),)](w, out, w.numel(), BLOCK=block, num_warps=4)


def probe(k: int, n: int, bandwidth: float) -> dict[str, Any]:
    import torch

    kw = k // 8
    nbytes = kw * n * 4
    copies = copies_past_l2(nbytes)
    cols = [
        torch.randint(-(2**31), 2**31 - 1, (kw, n), dtype=torch.int32, device="cuda") for _ in range(copies)
    ]
    rows = [c.t().contiguous() for c in cols]  # [N, KW]
    out = torch.empty(64 * n, dtype=torch.int32, device="cuda")
    flat_out = torch.empty(kw * n // 1024 + 1, dtype=torch.int32, device="cuda")
    result: dict[str, Any] = {"k": k, "n": n, "bytes": nbytes}

    def timed(fns: list) -> dict[str, float]:
        t = graph_ms(fns)
        return {"us": round(t * 1e3, 2), "bw": round(nbytes / (t / 1e3) / bandwidth, 3)}

    result["flat"] = timed([functools.partial(_launch_flat, w, flat_out, 1024) for w in cols])
    result["columns"] = []
    for words, block_n, split, warps in itertools.product((8, 16), (64, 128, 256), (4, 8, 16), (4,)):
        cfg = {"words": words, "block_n": block_n, "split": split, "warps": warps}
        result["columns"].append({**cfg, **timed([functools.partial(_launch_columns, w, out, words, block_n, split, warps) for w in cols])})  # fmt: skip
    result["rows"] = []
    for block_kw, block_n, split, warps in itertools.product((128, 256, 512), (2, 4, 8), (1, 2, 4), (4,)):
        if block_kw > kw:
            continue
        cfg = {"block_kw": block_kw, "block_n": block_n, "split": split, "warps": warps}
        result["rows"].append({**cfg, **timed([functools.partial(_launch_rows, w, out, block_kw, block_n, split, warps) for w in rows])})  # fmt: skip
    for key in ("columns", "rows"):
        result[f"{key}_best"] = min(result[key], key=lambda r: r["us"])
    print(f"[probe] {k}x{n}: flat {result['flat']} columns {result['columns_best']} rows {result['rows_best']}",
          flush=True)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    from loadtest.common import measure_copy_bandwidth

    bandwidth = measure_copy_bandwidth("cuda")["bytes_per_s"]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "copy_bandwidth_gbs": round(bandwidth / 1e9),
    }
    for name, (k, n) in {
        "qkv": (4096, 6144),
        "o": (4096, 4096),
        "gate_up": (4096, 28672),
        "down": (14336, 4096),
    }.items():
        report[name] = probe(k, n, bandwidth)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
