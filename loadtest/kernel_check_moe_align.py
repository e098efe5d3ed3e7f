"""kernel_check_moe.py's alignment checks: the one-launch kernel (ops/triton/moe_align.py) against the
torch ops it replaces (ops.triton.fused_moe.moe_align_block_size, the spec).

1. Bit for bit, all three outputs, at the layer shapes' expert counts and top_k: 1..8192 tokens (past
   fused_moe's ALIGN_KERNEL_MAX_PAIRS too, the kernel called directly), the models' routing and the
   skewed one, BLOCK_M 16 and 64.
2. The alignment alone in CUDA graphs, kernel and torch ops, us per call at each token count: the
   numbers that place ALIGN_KERNEL_MAX_PAIRS (the kernel is one program, sequential over the pairs).
The whole layer with the kernel on and off is kernel_check_moe.timing's pair of columns.

Smoke form (CPU, Triton interpreter): 1, 8 and 70 tokens (70 x 4 pairs: several chunks); times are one
wall-clock call.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from loadtest.kernel_check_common import check_true, env_switch, time_ms

if TYPE_CHECKING:
    from loadtest.kernel_check_moe import MoeShape

ALIGN_TOKENS, SMOKE_ALIGN_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), (1, 8, 70)


def align_kernel(on: bool) -> AbstractContextManager[None]:
    """WEIR_MOE_ALIGN_KERNEL set to on / off while active (fused_moe reads it at each call), then put back."""
    return env_switch("WEIR_MOE_ALIGN_KERNEL", on)


def routing(shape: MoeShape, num_tokens: int, device: torch.device, seed: int, skewed: bool) -> torch.Tensor:
    """topk_ids [num_tokens, top_k] int64 as kernel_check_moe.make_tokens routes (without the hidden states)."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(num_tokens, shape.experts, device=device, generator=g)
    if skewed:
        logits[:, : shape.top_k] += 100.0
    return logits.topk(shape.top_k, dim=-1).indices


def align_correctness(results: dict, name: str, shape: MoeShape, device: torch.device, smoke: bool) -> None:
    from ops.triton.fused_moe import moe_align_block_size
    from ops.triton.moe_align import moe_align_block_size_kernel

    for num_tokens in SMOKE_ALIGN_TOKENS if smoke else ALIGN_TOKENS:
        for skewed in (False, True):
            ids = routing(shape, num_tokens, device, seed=5000 + num_tokens, skewed=skewed)
            same = []
            for block_m in (16, 64):
                spec = moe_align_block_size(ids, shape.experts, block_m)
                got = moe_align_block_size_kernel(ids, shape.experts, block_m)
                same.append(all(torch.equal(g, s) for g, s in zip(got, spec, strict=True)))
            label = f"{name} moe_align {num_tokens} tok{' skewed' if skewed else ''}"
            check_true(results, f"{label}: kernel == torch ops (bit for bit, BLOCK_M 16 and 64)", all(same))


def align_timing(results: dict, name: str, shape: MoeShape, device: torch.device, smoke: bool) -> None:
    from ops.triton.fused_moe import ALIGN_KERNEL_MAX_PAIRS, default_block_m, moe_align_block_size
    from ops.triton.moe_align import moe_align_block_size_kernel

    rows = results["timings"].setdefault("moe_align", [])
    for num_tokens in SMOKE_ALIGN_TOKENS if smoke else ALIGN_TOKENS:
        ids = routing(shape, num_tokens, device, seed=6000 + num_tokens, skewed=False)
        block_m = default_block_m(num_tokens)
        args = (ids, shape.experts, block_m)
        torch_ms = time_ms(lambda a=args: moe_align_block_size(*a), device)
        kernel_ms = time_ms(lambda a=args: moe_align_block_size_kernel(*a), device)
        row = {
            "shape": name,
            "tokens": num_tokens,
            "pairs": ids.numel(),
            "block_m": block_m,
            "torch_ms": torch_ms,
            "kernel_ms": kernel_ms,
            "kernel_used_by_fused_moe": device.type == "cuda" and ids.numel() <= ALIGN_KERNEL_MAX_PAIRS,
        }
        rows.append(row)
        print(
            f"  {name:14s} moe_align {num_tokens:5d} tok ({row['pairs']:6d} pairs): kernel "
            f"{kernel_ms * 1e3:7.1f} us, torch ops {torch_ms * 1e3:7.1f} us in graphs"
            f"{'' if row['kernel_used_by_fused_moe'] else ' (past the threshold: torch ops)'}",
            flush=True,
        )


def print_align_summary(results: dict) -> None:
    rows = results["timings"].get("moe_align", [])
    if rows:
        print("moe_align alone, us in CUDA graphs: kernel / torch ops (* = fused_moe uses the kernel)")
    for r in rows:
        mark = "*" if r["kernel_used_by_fused_moe"] else " "
        print(
            f"  {r['shape']:14s} {r['tokens']:5d} tok {r['pairs']:6d} pairs {mark} "
            f"{r['kernel_ms'] * 1e3:7.1f} / {r['torch_ms'] * 1e3:7.1f} us"
        )
