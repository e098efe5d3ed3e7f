"""gpu_kernel_check.py's `moe` part, integer experts: the fused MoE kernel's W4A16 variant (GPTQ / AWQ /
compressed-tensors experts, ops.moe_quant.IntExpertScales) at the real layer shapes of
kernel_check_moe.py, with the checkpoint's column order and with act order (`w13_perm`: GEMM 1 gathers
x's columns through each expert's permutation, the A_PERM variant).

Weights: random 4-bit codes in int32 words (packed along K), group 128, float32 scales ~ N(0, 1/fan_in)
/ 4 and zeros 8, so each dequantized weight is (code - 8) * scale; act order: a random permutation of H
per expert (the codes are the same: only x's gather changes).

Each order is run in two storage layouts: the checkpoint's ([E, N, K / pf] words, [E, N, G] scales) and
K-major (the same values stored [E, K / pf, N] / [E, G, N], what engine.model.quantization.wna16_moe
keeps after loading; label "k-major").

1. Correctness at 1 and 8 tokens, outputs poisoned first: against ops.reference.fused_moe in float32 on
   the upcast inputs (which dequantizes the same codes and gathers x alike): rel err < 1e-2.
2. Timings in CUDA graphs (as the engine runs decode), cycling over routings as kernel_check_moe.timing:
   ms per call at 1, 8 and 64 tokens, both orders and layouts, against the floor of the bytes the op must
   move (the touched experts' codes, scales and zeros, the hidden states and intermediates). At <= 8
   tokens fused_moe takes the GEMVs (ops/triton/moe_wna16_gemv.py); "grouped GEMM" rows time the same
   calls with WEIR_MOE_INT_GEMV=0 (the grouped GEMM's decode tile), in one process.
3. Other decode tiles of the grouped GEMM (WEIR_MOE_INT_TILES="n,k,stages;...", none by default;
   "checkpoint order nN kK sS": ops.triton.fused_moe's DECODE_TILE set to that tile, WEIR_MOE_INT_GEMV=0)
   and other GEMV launches (WEIR_MOE_GEMV_LAUNCHES="block_n,split_k,num_warps;...", split_k 0: the
   default; "k-major gemv nN sS wW", K-major layout): correctness at 8 tokens, timings at 1 and 8.

Smoke form (CPU, Triton interpreter, float32): the tiny shapes at 8 tokens, one wall-clock call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator

import torch

from engine.model.quantization.wna16_moe import k_major
from loadtest.gpu_timing import copies_past_l2
from loadtest.kernel_check_common import Poisoned, check_close, env_switch, guarded, time_ms
from ops import reference
from ops.moe_quant import IntExpertScales

BITS, GROUP = 4, 128
SMOKE_GROUP = 16
TOKENS, SMOKE_TOKENS = (1, 8, 64), (8,)
TOL_FP32 = 1e-2


def make_int_layer(shape, device: torch.device, seed: int, group: int) -> tuple:  # noqa: ANN001
    """(w13 words [E, 2I, H / 8], w2 words [E, H, I / 8], scales: IntExpertScales in the checkpoint's
    order, perm [E, H] int32): random codes, the scales of N(0, 1/fan_in) weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    e, h, i = shape.experts, shape.hidden, shape.intermediate

    def words(n: int, k: int) -> torch.Tensor:
        return torch.randint(
            -(2**31), 2**31 - 1, (e, n, k // 8), device=device, dtype=torch.int32, generator=g
        )

    def scales(n: int, k: int) -> torch.Tensor:  # codes - 8 spread over +-8: about N(0, 1/k) weights
        return torch.full((e, n, k // group), k**-0.5 / 4, device=device)

    s13, s2 = scales(2 * i, h), scales(h, i)
    quant = IntExpertScales(BITS, s13, torch.full_like(s13, 8.0), s2, torch.full_like(s2, 8.0))
    perm = torch.stack([torch.randperm(h, device=device, generator=g) for _ in range(e)]).to(torch.int32)
    return words(2 * i, h), words(h, i), quant, perm


def int_moe_bytes(shape, ids: torch.Tensor, group: int, act_itemsize: int) -> int:  # noqa: ANN001
    """The bytes the op must move: the touched experts' codes (half a byte a weight), their float32 scales
    and zeros, the hidden states in and out and the [pairs, I] / [pairs, H] intermediates."""
    touched = int(ids.unique().numel())
    weights = 3 * shape.hidden * shape.intermediate
    codes_and_groups = touched * (weights // 2 + 2 * 4 * weights // group)
    tokens, pairs = ids.shape[0], ids.numel()
    acts = 2 * tokens * shape.hidden + 2 * pairs * (shape.intermediate + shape.hidden)
    return codes_and_groups + acts * act_itemsize


def _k_major_scales(q: IntExpertScales) -> IntExpertScales:
    return IntExpertScales(
        q.bits, k_major(q.w13_scales), k_major(q.w13_zeros), k_major(q.w2_scales), k_major(q.w2_zeros),
        q.w13_perm,
    )  # fmt: skip


def int_experts_part(results: dict, shapes: dict, device: torch.device, smoke: bool, make_tokens) -> None:  # noqa: ANN001
    """Correctness and timings of the integer experts in both orders and layouts, per shape (module
    docstring)."""
    from ops.triton.fused_moe import fused_moe
    from ops.triton.moe_wna16_gemv import fused_moe_wna16_gemv

    dtype = torch.float32 if smoke else torch.bfloat16
    group = SMOKE_GROUP if smoke else GROUP
    copy_gbs = results.get("copy_bandwidth_gbs", float("nan"))
    decode = SMOKE_TOKENS if smoke else (1, 8)
    for index, (name, shape) in enumerate(shapes.items()):
        w13, w2, quant, perm = make_int_layer(shape, device, seed=50 + index, group=group)
        acted = IntExpertScales(
            BITS, quant.w13_scales, quant.w13_zeros, quant.w2_scales, quant.w2_zeros, perm
        )
        k13, k2 = k_major(w13), k_major(w2)
        runs = [  # (label, words13, words2, scales, token counts, WEIR_MOE_INT_GEMV)
            ("checkpoint order", w13, w2, quant, SMOKE_TOKENS if smoke else TOKENS, True),
            ("act order", w13, w2, acted, SMOKE_TOKENS if smoke else TOKENS, True),
            ("k-major", k13, k2, _k_major_scales(quant), SMOKE_TOKENS if smoke else TOKENS, True),
            ("k-major act order", k13, k2, _k_major_scales(acted), decode, True),
            ("checkpoint order grouped GEMM", w13, w2, quant, decode, False),
            ("k-major grouped GEMM", k13, k2, _k_major_scales(quant), decode, False),
        ]
        for tile in _tiles_from_env("WEIR_MOE_INT_TILES"):
            runs.append(("checkpoint order n{} k{} s{}".format(*tile), w13, w2, quant, decode, False, tile))
        for label, a13, a2, q, token_counts, gemv, *tile in runs:
            with (
                env_switch("WEIR_MOE_INT_GEMV", gemv),
                _decode_tile(tile[0]) if tile else contextlib.nullcontext(),
            ):
                _check_and_time(results, name, label, shape, a13, a2, q, dtype, (1, 8) if not smoke else decode, token_counts, group, copy_gbs, make_tokens, fused_moe)  # fmt: skip
        for block_n, split_k, warps in _tiles_from_env("WEIR_MOE_GEMV_LAUNCHES"):
            launch = {"block_n": block_n, "num_warps": warps, **({"split_k": split_k} if split_k else {})}
            fn = functools.partial(fused_moe_wna16_gemv, **launch)
            label = f"k-major gemv n{block_n} s{split_k or 'default'} w{warps}"
            _check_and_time(results, name, label, shape, k13, k2, _k_major_scales(quant), dtype, decode, decode, group, copy_gbs, make_tokens, fn)  # fmt: skip
        del w13, w2, quant, acted, k13, k2


def _check_and_time(results: dict, name: str, label: str, shape, w13, w2, q, dtype, check_tokens, token_counts, group: int, copy_gbs: float, make_tokens, fn) -> None:  # fmt: skip  # noqa: ANN001
    for num_tokens in check_tokens:
        guarded(results, f"{name} int4 {label} {num_tokens} tok correctness", _correct, results, name, label, shape, w13, w2, q, dtype, num_tokens, make_tokens, fn)  # fmt: skip
    for num_tokens in token_counts:
        guarded(results, f"{name} int4 {label} {num_tokens} tok timing", _timing, results, name, label, shape, w13, w2, q, dtype, num_tokens, group, copy_gbs, make_tokens, fn)  # fmt: skip


def _tiles_from_env(name: str) -> list[tuple[int, int, int]]:
    """`name`="a,b,c;...": WEIR_MOE_INT_TILES (n, k, stages) or WEIR_MOE_GEMV_LAUNCHES (block_n, split_k,
    num_warps): more launches to time the integer experts with at 1 and 8 tokens."""
    spec = os.environ.get(name, "")
    return [tuple(int(v) for v in t.split(",")) for t in spec.split(";") if t.strip()]


@contextlib.contextmanager
def _decode_tile(tile: tuple[int, int, int]) -> Iterator[None]:
    """fused_moe's launches pick `tile` (BLOCK_N, BLOCK_K, stages) at decode batches: its DECODE_TILE,
    which default_tile reads at each launch (fitted to the layer as the default is)."""
    fm = importlib.import_module("ops.triton.fused_moe")  # (ops.triton's fused_moe is the function)
    decode_tile = fm.DECODE_TILE
    fm.DECODE_TILE = tile
    try:
        yield
    finally:
        fm.DECODE_TILE = decode_tile


def _correct(results: dict, name: str, label: str, shape, w13, w2, q, dtype, num_tokens: int, make_tokens, fused_moe) -> None:  # fmt: skip  # noqa: ANN001
    x, tw, ti = make_tokens(shape, num_tokens, dtype, w13.device, seed=4000 + num_tokens)
    with Poisoned():
        out = fused_moe(x, w13, w2, tw, ti, q)
    ref = reference.fused_moe(x.float(), w13, w2, tw, ti, q)
    check_close(
        results, f"{name} fused_moe int4 {label} {num_tokens} tok vs float32 reference", out, ref, TOL_FP32
    )


def _timing(results: dict, name: str, label: str, shape, w13, w2, q, dtype, num_tokens: int, group: int, copy_gbs: float, make_tokens, fused_moe) -> None:  # fmt: skip  # noqa: ANN001
    device = w13.device
    first = make_tokens(shape, num_tokens, dtype, device, seed=5000 + num_tokens)
    all_bytes = int_moe_bytes(shape, first[2], group, first[0].element_size())
    copies = [first]
    if device.type == "cuda":  # different routings so consecutive calls read different experts
        more = min(8, copies_past_l2(all_bytes)) - 1
        copies += [
            make_tokens(shape, num_tokens, dtype, device, seed=5001 + num_tokens + c) for c in range(more)
        ]
    fns = [lambda c=c: fused_moe(c[0], w13, w2, c[1], c[2], q) for c in copies]
    ms = time_ms(fns, device)
    floor_ms = all_bytes / (copy_gbs * 1e6)
    row = {"shape": name, "order": label, "tokens": num_tokens, "ms_graph": ms, "min_bytes": all_bytes,
           "floor_ms": floor_ms, "frac_floor": floor_ms / ms, "touched_experts": int(first[2].unique().numel())}  # fmt: skip
    results["timings"].setdefault("moe_int4", []).append(row)
    print(
        f"  {name:14s} int4 {label:16s} {num_tokens:3d} tok: {ms * 1e3:8.1f} us in graphs "
        f"({row['frac_floor']:4.0%} of the {floor_ms * 1e3:.1f} us floor, {row['touched_experts']} experts)",
        flush=True,
    )
