"""Batch-1 decode of unquantized (bf16/fp16) linears through a Triton GEMV instead of cuBLAS.

At one token a linear layer streams its weights once; cuBLAS reaches 0.64-0.75 of the copy bandwidth on
the attention-side projections of an 8B model on an H200 (qkv 4096x6144, o 4096x4096), where each launch
spends ~4.5 us ramping up and draining. The float-weight GEMV of ops/triton/fp8_gemv.py (it converts
any float weight in registers; unit scales here), with 8-row tiles 512 columns deep and no split, is
faster there: qkv 14.38 us vs 16.24, o 10.86 vs 12.68 (H200 sweep at c2fa90c,
`loadtest/results/gemv-pdl-lora-h200-2026-12-03-c2fa90c/`); on the MLP's shapes it about ties cuBLAS
(gate_up 54.6 vs 54.8, down 30.4 vs 30.4 there; down 29.8 vs 31.1 at 835ef63, so down takes it, see
`_LAUNCHES`). gate_up takes it as a gated launch, silu(gate) * up in its epilogue (`plan_gated_gemv`,
the MLP's activation without a launch of its own). Every shape not listed keeps cuBLAS, unless the
layer has a LoRA adapter: then the GEMV also adds the LoRA expand in its epilogue (one launch less,
engine/lora/gemv.py) and the MLP's shapes take it too (`plan_float_gemv(..., lora=True)`).

Only inside CUDA graphs: the runner allows the GEMV while it warms up and captures (`decode_gemv_allowed`),
and replays run what was captured. An eager step keeps cuBLAS, since a Triton launch costs ~20-30 us of
host time, more than the GEMV saves.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator

import torch

from ops.env_flags import env_flag

_allowed = False


@contextlib.contextmanager
def decode_gemv_allowed() -> Iterator[None]:
    """Batch-1 linears may take the GEMV inside this block (the CUDA-graph warm-up and capture)."""
    global _allowed
    previous, _allowed = _allowed, True
    try:
        yield
    finally:
        _allowed = previous


def decode_gemv_is_allowed() -> bool:
    return _allowed


# (in_features, out_features) -> the launch, from the H200 sweep; shapes not listed keep cuBLAS
# (the H200 sweep at 835ef63, gemv-half2-gated-h200-2026-12-04/sweep-835ef63: qkv 14.57 us vs cuBLAS 14.66, o 10.73
# vs 12.72, down 29.78 vs 31.13; gate_up 56.59 vs 56.78, a tie, keeps cuBLAS)
# x's next tile requested ahead (what the folded W4A16 GEMV gained from) did not pay here: with it on
# these three and the gated gate_up the bf16 batch-1 step took 4.350 / 4.349 ms against 4.264 / 4.263
# without (A/B in one call, loadtest/results/folded-gemv-h200-2026-12-04/7-xahead-ab-6c25784); removed
_LAUNCHES: dict[tuple[int, int], dict[str, int]] = {
    (4096, 6144): {"block_n": 8, "block_k": 512, "split_k": 1},  # Llama-3-8B qkv
    (4096, 4096): {"block_n": 4, "block_k": 512, "split_k": 1, "prefetch": True},  # Llama-3-8B o_proj
    (14336, 4096): {"block_n": 4, "block_k": 512, "split_k": 1, "prefetch": True},  # Llama-3-8B down_proj
}


# With a LoRA adapter the GEMV also adds the expand's term (ops/triton/lora_gemv.py), which saves a
# launch whatever the shape: the MLP's shapes, where the plain GEMV only ties cuBLAS, take it too, at
# the H200 sweep's best launches (gate_up 54.63 us vs cuBLAS 54.83, down 29.05 vs 30.42).
# `fuse_shrink` (the shrink in the same launch, ops.triton.lora_gemv.gemv_lora), `shrink_chunk` (K per
# shrink worker), `reduce_t` (the fused shrink's partials summed once by a ticket, not by every GEMV
# program) and `early_b` (B's columns loaded before the K loop): the best of loadtest/sweep_lora_gemv.py
# per layer (H200, CUDA-graph replays, rank 16, 0e90f80: qkv 18.67 us vs 21.67 before, o 13.32 vs
# 14.74, gate_up 62.77 vs 63.55, down 33.37 vs 38.03; the plain GEMVs 14.29 / 11.20 / 57.32 / 31.42).
_LORA_LAUNCHES: dict[tuple[int, int], dict[str, int | bool]] = {
    (4096, 6144): {  # Llama-3-8B qkv
        "block_n": 8,
        "block_k": 512,
        "split_k": 1,
        "fuse_shrink": True,
        "shrink_chunk": 256,
        "reduce_t": True,
    },
    (4096, 4096): {  # o_proj
        "block_n": 8,
        "block_k": 512,
        "split_k": 1,
        "fuse_shrink": True,
        "reduce_t": True,
        "early_b": True,
    },
    (4096, 28672): {  # gate_up
        "block_n": 16,
        "block_k": 256,
        "split_k": 1,
        "prefetch": False,
        "shrink_chunk": 256,
        "early_b": True,
    },
    (14336, 4096): {  # down
        "block_n": 8,
        "block_k": 512,
        "split_k": 1,
        "prefetch": True,
        "fuse_shrink": True,
        "shrink_chunk": 128,
        "reduce_t": True,
        "early_b": True,
    },
}


# [gate; up] projections at one token, silu(gate) * up in the GEMV's epilogue: the plain GEMV's best
# launch on gate_up (56.59 us vs cuBLAS 56.78 at 835ef63), each 8-row tile 4 gate and 4 up rows
_GATED_LAUNCHES: dict[tuple[int, int], dict[str, int]] = {
    (4096, 28672): {"block_n": 8, "block_k": 512, "split_k": 1},  # Llama-3-8B gate_up
}


def plan_gated_gemv(in_features: int, out_features: int) -> dict[str, int] | None:
    """The gated GEMV's launch for a [gate; up] layer of this shape at one token, or None."""
    return _GATED_LAUNCHES.get((in_features, out_features))


def plan_float_gemv(in_features: int, out_features: int, lora: bool = False) -> dict[str, int | bool] | None:
    """The GEMV launch for a layer of this shape at one token, or None (cuBLAS is as fast). With
    `lora` the plan of a layer that also adds a LoRA term (engine.lora.gemv): more shapes have one."""
    return (_LORA_LAUNCHES if lora else _LAUNCHES).get((in_features, out_features))


# (in_features, out_features) -> the tensor-core skinny GEMM's launch at 2-16 tokens
# (ops/triton/skinny_gemm.py), the least total time over 2, 4, 8 and 16 tokens in the H100 sweep at 2330fb4
# (loadtest/results/skinny-h100-2026-12-06-2330fb4/; microseconds at 8 tokens against cuBLAS): qkv 19.45 vs
# 21.00, o 14.01 vs 15.59, gate_up 80.14 vs 82.28, down 42.31 vs 43.83; it won at every token count swept.
# WEIR_SKINNY_GEMM switches it; on by default since 2026-12-07: it takes L1's batch 8 from 6.18 to 5.94 ms on an
# H100 and leaves T2 as it was. Before PDL was on, every decode graph without a skinny launch (batch 1, 32-256)
# replayed 1.2-2.1% slower in an engine with it on (not the kernel's doing as such: the engine without it reaches
# the same slower speed, for good, after the first work on any third CUDA stream; README, Known limits;
# loadtest/probe_carveout.py, loadtest/results/graph-stream-state-h100-2026-12-06-701f95a/); with PDL on, one run
# on an H100 showed batch 1 at 5.547 ms against 5.553 without it, batch 8 5.877 against 6.100
# (loadtest/results/decode-attn-h100-2026-12-07-e507e83/call1-e507e83, sb80a against abold1 / abold2).
_SKINNY_LAUNCHES: dict[tuple[int, int], dict[str, int]] = {
    (4096, 6144): {"block_n": 64, "block_k": 128, "split_k": 1, "num_warps": 4, "num_stages": 5},  # qkv
    (4096, 4096): {"block_n": 64, "block_k": 128, "split_k": 1, "num_warps": 4, "num_stages": 5},  # o_proj
    (4096, 28672): {"block_n": 128, "block_k": 256, "split_k": 1, "num_warps": 4, "num_stages": 3},  # gate_up
    (14336, 4096): {"block_n": 64, "block_k": 256, "split_k": 1, "num_warps": 4, "num_stages": 5},  # down
}
SKINNY_MIN_TOKENS, SKINNY_MAX_TOKENS = 2, 16  # one token takes the GEMV (_LAUNCHES) or cuBLAS


@functools.cache
def _skinny_launches() -> dict[tuple[int, int] | str, dict[str, int]]:
    """The table above, or where WEIR_SKINNY_GEMM_LAUNCHES names a JSON file ({"KxN": {launch}}, e.g. what
    `sweep_gemv.py --kinds skinny --skinny-launches-out` found best on this card; "*": a launch for every
    shape not listed) that file's launches."""
    path = os.environ.get("WEIR_SKINNY_GEMM_LAUNCHES", "")
    if not path:
        return dict(_SKINNY_LAUNCHES)
    with open(path) as f:
        table = json.load(f)
    return {
        key if key == "*" else tuple(int(v) for v in key.split("x")): {n: int(v) for n, v in launch.items()}
        for key, launch in table.items()
    }


def plan_skinny_gemm(in_features: int, out_features: int) -> dict[str, int] | None:
    """The skinny GEMM's launch for a layer of this shape at 2-16 tokens, or None (cuBLAS)."""
    if not env_flag("WEIR_SKINNY_GEMM"):
        return None
    table = _skinny_launches()
    return table.get((in_features, out_features), table.get("*"))


def skinny_gemm_supported(weight: torch.Tensor) -> bool:
    """As float_gemv_supported, float32 weights too (the skinny GEMM multiplies them exactly, for checks)."""
    if weight.dtype == torch.float32 and weight.stride(-1) == 1:
        return hopper_with_triton(weight.device)
    return float_gemv_supported(weight)


def skinny_gemm_linear(
    x: torch.Tensor,  # [..., in], 2-16 tokens
    weight: torch.Tensor,  # [out, in]: x's dtype, or float8_e4m3fn with weight_scale (W8A16)
    bias: torch.Tensor | None,
    launch: dict[str, int],
    weight_scale: torch.Tensor | None = None,  # [out] float32: an FP8 weight's per-row scales
) -> torch.Tensor:  # [..., out]
    from ops.triton.skinny_gemm import skinny_gemm  # noqa: PLC0415

    x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = skinny_gemm(x2, weight, weight_scale=weight_scale, **launch)  # [tokens, out]
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out.shape[-1])


def hopper_with_triton(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0+ (where the Triton decode kernels were measured), with
    Triton importable."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        import ops.triton.fp8_gemv  # noqa: F401, PLC0415 (importing triton needs a GPU or the interpreter)
    except ImportError:
        return False
    return True


def float_gemv_supported(weight: torch.Tensor) -> bool:
    """16-bit weights contiguous along K on a Hopper-class GPU with Triton (hopper_with_triton)."""
    if weight.dtype not in (torch.bfloat16, torch.float16) or weight.stride(-1) != 1:
        return False
    return hopper_with_triton(weight.device)


def float_gemv_linear(
    x: torch.Tensor,  # [..., in], one token
    weight: torch.Tensor,  # [out, in]
    unit_scale: torch.Tensor,  # [out] float32 ones
    bias: torch.Tensor | None,
    launch: dict[str, int],
    l2_next: torch.Tensor | None = None,  # the next projection's weight bytes (l2_prefetch_chain)
) -> torch.Tensor:  # [..., out]
    from ops.triton.fp8_gemv import fp8_gemv  # noqa: PLC0415

    out = fp8_gemv(x.reshape(1, -1), weight, unit_scale, None, **launch, l2_next=l2_next)  # [1, out]
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out.shape[-1])
