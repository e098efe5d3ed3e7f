"""GPTQ and AWQ (and SqueezeLLM's tables, `apply_lut`) on CUDA: the weights repacked at load into the Triton W4A16/W8A16 kernels' layout
(ops/triton/wna16_gemm.py) and each matmul dispatched by shape. CPU keeps the dequantize-then-F.linear
reference (engine.model.quantization.common); so does a GPU layer the kernels cannot run (uneven
act-order groups, shapes not packing whole words, or no Triton).

Two decisions, both pure functions of python values so they are testable without a GPU and the same
on every CUDA-graph replay:
- `use_wna16_kernels(...)`, once per layer at load: kernel layout or the reference's;
- `plan_wna16(num_tokens, in_features, out_features, group_size, num_sms)`, per call (cached per
  shape): the GEMV for 1-4 tokens (ops/triton/w4_half2_gemv.py for 4-bit codes with small integer zero
  points and 16-bit x, else ops/triton/wna16_gemv.py), a fused GEMM launch shape, or "dequant"
  (dequantize the weight, then cuBLAS) for large batches. Decode batches read every weight byte once
  and do little math: up to 4 tokens the GEMV (no tensor-core tile, codes converted without a
  conversion instruction, split-K summed in the same launch), 5-16 the GEMM with one 16-row tile,
  splitting K until the grid holds about four programs per SM (for 4-bit codes with small integer zero
  points and 16-bit x the tensor-core skinny GEMM instead at 3-255 tokens, `plan_w4_skinny`,
  ops/triton/w4_skinny_gemm.py); 17-255 tokens tile M as well; from 256
  tokens the matmul is compute-bound and cuBLAS on the dequantized weight wins (vLLM's AWQ takes the
  same turn at 256 tokens).

Kernel layout on the layer (replacing codes/zeros/scales): `qweight` int32 [in / pf, out],
`scales` and `zeros` float16 [groups, out] (exact: fp16 scales, integer zeros), `perm` (act order,
gathered from x per call), `wna16_bits` and `wna16_folded_ok` (the folded GEMV decodes its zero points
exactly).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.quantization.packing import pack_rows
from ops.env_flags import env_flag

DEQUANT_MIN_TOKENS = 256  # from here on: dequantize, then cuBLAS
GEMV_MAX_TOKENS = 4  # up to here: the GEMV (ops.triton.wna16_gemv.MAX_GEMV_TOKENS)
SMALL_BATCH = 16  # up to here: one 16-row tile of M, split-K
# from here to DEQUANT_MIN_TOKENS - 1: the tensor-core W4A16 GEMM, where a layer takes it (plan_w4_skinny)
SKINNY_MIN_TOKENS = 3
_PROGRAMS_PER_SM = 4
_MIN_K_PER_SPLIT = 256  # fewer rows per split and the partials' traffic and sum stop paying


@dataclass(frozen=True, slots=True)
class WNA16Launch:
    path: str  # "gemv" | "gemm" (fused kernel) | "dequant" (dequantize, then cuBLAS)
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = False  # GEMV: the next tile's words in flight while one is decoded
    # GEMV, 4-bit codes, integer zero points, 16-bit x: ops/triton/w4_half2_gemv.py (zero point folded into
    # the packed-fp16 decode), tiles requested `ahead`; other layers fall back to wna16_gemv at this launch
    folded: bool = False
    ahead: int = 1
    x_ahead: bool = False  # folded, one token: x's next pairs requested with the next tile
    meta_2d: bool = False  # folded: scales / zeros loaded in the word tiles' layout (WEIR_W4_META_2D)
    # skinny: the scale applied to the decoded tile in 16 bits (w4_skinny_gemm's `scaled`)
    scaled: bool = False


def use_wna16_kernels(
    device_type: str,
    triton_available: bool,
    uneven_groups: bool,
    bits: int,
    in_features: int,
    out_features: int,
) -> bool:
    """Whether a GPTQ/AWQ layer runs the Triton kernels (else the dequantize-then-F.linear reference)."""
    pack = 32 // bits
    return (
        device_type == "cuda"
        and triton_available
        and not uneven_groups  # act order with groups of unequal size: the kernel needs contiguous ones
        and in_features % pack == 0
        and out_features % 8 == 0  # 16-byte rows of int32 words / fp16 scales
    )


def plan_wna16(
    num_tokens: int, in_features: int, out_features: int, group_size: int, num_sms: int, gemv: bool = True
) -> WNA16Launch:
    """The launch for a [num_tokens, in_features] x [in_features, out_features] weight-only matmul.
    gemv=False: no GEMV path (SqueezeLLM's lookup tables run the GEMM at every small batch)."""
    if num_tokens >= DEQUANT_MIN_TOKENS:
        return WNA16Launch("dequant")
    if gemv and num_tokens <= GEMV_MAX_TOKENS:
        plan = plan_wna16_gemv(num_tokens, in_features, out_features, group_size, num_sms)
        if plan is not None:
            return plan
    if num_tokens <= SMALL_BATCH:
        block_m, block_n, block_k = 16, 64, 128
    else:
        block_m, block_n, block_k = (32 if num_tokens <= 32 else 64), 64, 64
    # Tiles within one group load one row of scales and zeros per tile: shrink block_k to the group
    # when the group is smaller (32, 64).
    while group_size % block_k and block_k > 32:
        block_k //= 2
    tiles = -(-num_tokens // block_m) * -(-out_features // block_n)
    split_k = 1
    target = _PROGRAMS_PER_SM * num_sms
    while (
        tiles * split_k * 2 <= target
        and in_features // (split_k * 2) >= max(_MIN_K_PER_SPLIT, block_k)
        and split_k < 16
    ):
        split_k *= 2
    return WNA16Launch("gemm", block_m, block_n, block_k, split_k)


def plan_wna16_gemv(
    num_tokens: int, in_features: int, out_features: int, group_size: int, num_sms: int
) -> WNA16Launch | None:
    """The GEMV's launch, from the sweeps on an H200 at Llama-3-8B's four shapes (loadtest/sweep_gemv.py;
    loadtest/results/gemv-sweep-h200-2026-12-03-cb7dcc4, -cb9a06e, gemv-half2-gated-h200-2026-12-04/
    sweep-835ef63 and folded-gemv-h200-2026-12-04/1-sweep-9864c10): tiles of 128 rows of K inside one
    group. At 1-4 tokens the folded packed-fp16 GEMV (ops/triton/w4_half2_gemv.py, the next tile, its
    scales and zeros requested ahead): at one token 64-word column tiles on 2 warps with x's next pairs
    requested ahead too, K split 16 for the down projection, 4 for the widest layers, else 8
    (folded-gemv-h200-2026-12-04/5-sweep-5714741: qkv 8.15 us, o 6.96, gate_up 23.12, gated 24.04,
    down 13.07; without x ahead 8.92 / 7.64 / 25.62 / 26.81 / 14.45; wna16_gemv's packed decode at 9864c10:
    qkv 9.18, o 7.81, gate_up 26.63, gated 27.34, down 16.11); at two tokens split 8, 2 for the widest layers
    (qkv 11.37 vs 13.24, o 9.09 vs 10.22, gate_up 32.91 vs 42.95, down 19.53 vs 24.66); at 3-4 tokens
    (4 rows) split 2 for the widest layers, 8 for the down projection and the square o, else 4, with two
    tiles ahead where a split holds 8 or more (1e2a45b, 2-sweep: qkv 15.00 us, o 12.57, gate_up 49.33,
    gated 50.32, down 26.84; wna16_gemv's float32 decode took 21.3 / 16.2 / 78.4 / 43.5 at cb7dcc4).
    Layers the folded GEMV cannot take (8-bit codes, zero points that are not small integers, float32
    x) run wna16_gemv at the same launch. None when no tile of 32 rows or more fits the groups."""
    block_k = 128
    while group_size % block_k and block_k > 32:
        block_k //= 2  # groups of 32 or 64
    if group_size % block_k:
        return None
    del num_sms  # measured on 132 SMs; the splits are few enough to fill fewer
    meta_2d = env_flag("WEIR_W4_META_2D")  # off by default (ops/env_flags.py)
    if num_tokens == 1:
        split_k = 4 if out_features >= 16384 else (16 if in_features >= 8192 else 8)
        return WNA16Launch(
            "gemv",
            1,
            64,
            block_k,
            split_k,
            2,
            3,
            prefetch=True,
            folded=True,
            ahead=1,
            x_ahead=True,
            meta_2d=meta_2d,
        )
    if num_tokens == 2:
        split_k = 2 if out_features >= 16384 else 8
        return WNA16Launch(
            "gemv", 1, 64, block_k, split_k, num_warps=4, num_stages=3, folded=True, ahead=1, meta_2d=meta_2d
        )
    # 3-4 tokens (padded to 4 rows)
    if out_features >= 16384:
        split_k = 2
    else:
        split_k = 8 if in_features >= 8192 or out_features <= in_features else 4
    ahead = 2 if split_k <= 4 else 1  # a split of 8+ tiles keeps two in flight
    return WNA16Launch(
        "gemv", 1, 64, block_k, split_k, num_warps=4, num_stages=3, folded=True, ahead=ahead, meta_2d=meta_2d
    )


def plan_w4_skinny(
    num_tokens: int, in_features: int, out_features: int, group_size: int, num_sms: int
) -> WNA16Launch | None:
    """The tensor-core W4A16 GEMM's launch (ops/triton/w4_skinny_gemm.py) for 3-255 tokens, where a layer takes
    it (4-bit codes, integer zero points, 16-bit x: `_skinny_launch` checks), else None. From the H100 sweeps
    (loadtest/probe_tinygemm.py; loadtest/results/w4-skinny-h100-2026-12-07-593d2fe/): each weight decoded
    exactly, scaled and rounded to x's 16-bit type (`scaled`, so the dot accumulates across tiles: 1.3-1.5x
    faster than scaling each tile's float32 sums), 64-column tiles, 3 stages, 4 warps. Up to 16 tokens one
    16-row tile, K split until the grid holds about 2.5 programs an SM and 4 ways where one split already fills
    it (the widest layers); Llama-3-8B's layer at 8 tokens 85.0 us (qkv 12.30, o 10.08, gate_up 40.21, down
    22.40) against the W4A16 GEMM's 146.4; its time barely depends on the rows, so at 3-4 tokens it beats the
    GEMV too (gate_up 39.84 against the gated GEMV's 50.41), at 2 it does not (31.75). Past 16 tokens row tiles
    of 32 (to 32 tokens), 64 (to 64) and 128, with fewer splits as the row tiles grow (fitted to the sweep at
    a9e7b3d: the layer at 32 / 64 / 128 / 255 tokens 101.4 / 139.8 / 209.4 / 410.1 us against the GEMM's 185.6 /
    192.0 / 324.8 / 609.0; bf16's cuBLAS 160.1 / 162.6 / 170.9 / 203.4)."""
    if not SKINNY_MIN_TOKENS <= num_tokens < DEQUANT_MIN_TOKENS or not env_flag("WEIR_W4_SKINNY_GEMM"):
        return None
    block_k = 128
    while group_size % block_k and block_k > 32:
        block_k //= 2  # groups of 32 or 64
    if group_size % block_k:
        return None
    block_n = 64
    tiles = -(-out_features // block_n)
    wide = tiles >= 2.5 * num_sms  # one split alone fills the GPU (gate_up)
    split_k = 1
    while tiles * split_k < 2.5 * num_sms and in_features // (split_k * 2) >= 4 * block_k:
        split_k *= 2
    if num_tokens <= SMALL_BATCH:
        block_m = 16
        while wide and split_k < 4 and in_features // (split_k * 2) >= 4 * block_k:
            split_k *= 2  # gate_up at 8 tokens: 40.21 us in 4 splits, 42.44 in 2, 44.82 whole
    else:
        block_m = 32 if num_tokens <= 32 else (64 if num_tokens <= 64 else 128)
        if wide:  # gate_up in 2 splits: 46.74 / 69.38 / 108.99 us at 32 / 64 / 128 tokens
            split_k = 2 if in_features >= 2 * 4 * block_k else 1
        elif block_m == 64 and split_k >= 8 or block_m == 128:
            split_k = max(1, split_k // 2)  # o at 64 tokens: 15.89 us in 4 splits, 21.96 in 8
    return WNA16Launch("skinny", block_m, block_n, block_k, split_k, num_warps=4, num_stages=3, scaled=True)


def _num_sms(device_index: int) -> int:
    # a CPU tensor (the Triton interpreter, tests): an H100's 132 SMs
    return torch.cuda.get_device_properties(device_index).multi_processor_count if device_index >= 0 else 132


@functools.cache
def _plan_skinny(
    num_tokens: int, in_features: int, out_features: int, group_size: int, device_index: int
) -> WNA16Launch | None:
    return plan_w4_skinny(num_tokens, in_features, out_features, group_size, _num_sms(device_index))


@functools.cache
def _plan(
    num_tokens: int,
    in_features: int,
    out_features: int,
    group_size: int,
    device_index: int,
    gemv: bool = True,
) -> WNA16Launch:
    return plan_wna16(num_tokens, in_features, out_features, group_size, _num_sms(device_index), gemv)


def triton_wna16_available() -> bool:
    try:
        import ops.triton.wna16_gemm  # noqa: F401, PLC0415 (importing triton needs a GPU or the interpreter)
    except ImportError:
        return False
    return True


# the zero points w4_half2_gemv decodes exactly (ops.triton.w4_half2_gemv.MAX_ZERO_POINT; a test keeps
# them equal: that module needs Triton, this one must load without it)
FOLDED_MAX_ZERO_POINT = 63
# WEIR_W4_COL_BLOCKED: the column block of the folded decode launches (plan_wna16_gemv's block_n)
COL_BLOCK_N = 64


def register_kernel_layout(
    layer: nn.Module,
    codes: torch.Tensor,  # [out, in] uint8, input columns in the kernel's (perm) order
    zeros: torch.Tensor,  # [out, G] float32
    scales: torch.Tensor,  # [out, G] float32
    perm: torch.Tensor | None,  # [in] int64
    bits: int,
) -> None:
    layer.register_buffer("qweight", pack_rows(codes.t(), bits))  # [in / pf, out] int32
    layer.register_buffer("scales", scales.t().to(torch.float16).contiguous())  # [G, out]
    layer.register_buffer("zeros", zeros.t().to(torch.float16).contiguous())  # [G, out]
    layer.register_buffer("perm", perm)
    layer.wna16_bits = bits
    # every format weir reads stores integer zero points; the folded GEMV needs them (checked once here)
    layer.wna16_folded_ok = bits == 4 and bool(
        ((zeros == zeros.round()) & (zeros >= 0) & (zeros <= FOLDED_MAX_ZERO_POINT)).all()
    )
    layer.wna16_col_blocked = None
    if layer.wna16_folded_ok and env_flag("WEIR_W4_COL_BLOCKED") and triton_wna16_available():
        # (an experiment, off by default: a second copy of the words, in the layout the folded decode
        # launches' programs read as one contiguous run each; a [gate | up] layer's in its gated launch's order)
        from ops.triton.w4_half2_gemv import col_blocked_qweight  # noqa: PLC0415

        sizes = getattr(layer, "output_partition_sizes", [])
        gated = len(sizes) == 2 and sizes[0] == sizes[1]
        blocked = col_blocked_qweight(layer.qweight, COL_BLOCK_N, gated)
        layer.register_buffer("qweight_col_blocked", blocked)  # [tiles, in / 8, COL_BLOCK_N]
        layer.wna16_col_blocked = gated


def apply_wna16(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x w + b through the Triton kernels: [..., in] -> [..., out]."""
    from ops.triton.wna16_gemm import wna16_dequantize, wna16_gemm  # noqa: PLC0415

    bits = layer.wna16_bits
    qweight = layer.qweight  # [in / pf, out]
    in_features, out_features, group_size = _dims(layer)
    x2 = x.reshape(-1, in_features)  # [tokens, in]
    if layer.perm is not None:
        x2 = x2.index_select(1, layer.perm)
    skinny = _skinny_launch(layer, x2, x.get_device())
    launch = None if skinny else _plan(x2.shape[0], in_features, out_features, group_size, x.get_device())
    if skinny is not None:  # 3-255 tokens (at 3-4 before the GEMV: faster there too)
        from ops.triton.w4_skinny_gemm import w4_skinny_gemm  # noqa: PLC0415

        out = w4_skinny_gemm(
            x2, qweight, layer.scales, layer.zeros, group_size, skinny.block_n, skinny.block_k, skinny.split_k,
            skinny.num_warps, skinny.num_stages, scaled=skinny.scaled, block_m=skinny.block_m,
        )  # fmt: skip
    elif launch.path == "dequant":
        w = wna16_dequantize(qweight, layer.scales, layer.zeros, bits, group_size, x.dtype)  # [in, out]
        out = torch.matmul(x2, w)
    elif launch.path == "gemv":
        out = _gemv(layer, x2, group_size, launch)
    else:
        out = wna16_gemm(
            x2, qweight, layer.scales, layer.zeros, bits, group_size,
            launch.block_m, launch.block_n, launch.block_k, launch.split_k, launch.num_warps, launch.num_stages,
        )  # fmt: skip
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out_features)


def apply_wna16_silu_mul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for a [gate | up] layer in the GEMV's own launch ([..., in] -> [..., out / 2]),
    where the batch takes the GEMV; None otherwise."""
    in_features, out_features, group_size = _dims(layer)
    x2 = x.reshape(-1, in_features)  # [tokens, in]
    launch = _plan(x2.shape[0], in_features, out_features, group_size, x.get_device())
    if launch.path != "gemv" or out_features % 2 or _skinny_launch(layer, x2, x.get_device()) is not None:
        return None  # (at 3-4 tokens the skinny GEMM, then SiLU-mul, beats the gated GEMV: 39.84 + ~2 vs 50.41 us)
    if layer.perm is not None:
        x2 = x2.index_select(1, layer.perm)
    return _gemv(layer, x2, group_size, launch, gated=True).view(*x.shape[:-1], out_features // 2)


def _skinny_launch(layer: nn.Module, x2: torch.Tensor, device_index: int) -> WNA16Launch | None:
    """The skinny GEMM's launch where this layer and batch take it: 4-bit codes with small integer zero points
    (the decode subtracts them exactly in 16 bits), 16-bit x, 3-255 tokens."""
    if not layer.wna16_folded_ok or x2.dtype not in (torch.bfloat16, torch.float16):
        return None
    in_features, out_features, group_size = _dims(layer)
    return _plan_skinny(x2.shape[0], in_features, out_features, group_size, device_index)


def _dims(layer: nn.Module) -> tuple[int, int, int]:
    """A kernel-layout layer's (in_features, out_features, group_size), from its packed tensors."""
    qweight = layer.qweight  # [in / pf, out]
    in_features = qweight.shape[0] * (32 // layer.wna16_bits)
    return in_features, qweight.shape[1], in_features // layer.scales.shape[0]


def _gemv(
    layer: nn.Module, x2: torch.Tensor, group_size: int, launch: WNA16Launch, gated: bool = False
) -> torch.Tensor:
    """The layer's GEMV at `launch` on x2 [tokens, in] (in the codes' column order)."""
    # WEIR_W4_COL_BLOCKED's copy (kept only for folded layers) where it holds this launch's tiles, gated or not
    blocked = (
        getattr(layer, "wna16_col_blocked", None) == gated and launch.folded and launch.block_n == COL_BLOCK_N
    )
    return run_wna16_gemv(
        x2, layer.qweight_col_blocked if blocked else layer.qweight, layer.scales, layer.zeros, layer.wna16_bits,
        group_size, launch, gated, layer.wna16_folded_ok, getattr(layer, "l2_prefetch", None), col_blocked=blocked,
    )  # fmt: skip


def run_wna16_gemv(
    x2: torch.Tensor,  # [tokens, in], in the codes' column order
    qweight: torch.Tensor,  # [in / pf, out] int32
    scales: torch.Tensor,  # [G, out]
    zeros: torch.Tensor,  # [G, out]
    bits: int,
    group_size: int,
    launch: WNA16Launch,
    gated: bool = False,
    folded_ok: bool = True,  # the zero points are integers the folded GEMV decodes exactly
    l2_next: torch.Tensor | None = None,  # the next projection's weights (l2_prefetch_chain), folded GEMV
    col_blocked: bool = False,  # qweight is col_blocked_qweight's [tiles, in / 8, block_n] (folded GEMV only)
) -> torch.Tensor:  # [tokens, out] (gated: [tokens, out / 2])
    """The GEMV a "gemv" launch runs: the folded packed-fp16 kernel where it applies, else wna16_gemv.
    The engine's layers and the benchmarks (loadtest/sweep_gemv.py, bench_quant.py) call this one."""
    if launch.folded and folded_ok and bits == 4 and x2.dtype in (torch.bfloat16, torch.float16):
        from ops.triton.w4_half2_gemv import w4_half2_gemv  # noqa: PLC0415

        return w4_half2_gemv(
            x2, qweight, scales, zeros, group_size, launch.block_n, launch.block_k, launch.split_k,
            launch.num_warps, launch.ahead, gated=gated, x_ahead=launch.x_ahead, l2_next=l2_next,
            meta_2d=launch.meta_2d, col_blocked=col_blocked,
        )  # fmt: skip
    from ops.triton.wna16_gemv import wna16_gemv  # noqa: PLC0415

    return wna16_gemv(
        x2.contiguous(), qweight, scales, zeros, bits, group_size, launch.block_n, launch.block_k,
        launch.split_k, launch.num_warps, launch.num_stages, launch.prefetch, gated,
    )  # fmt: skip


def apply_wna16_reference(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel layout computed in plain torch (the spec `apply_wna16` must match; tests)."""
    from engine.model.quantization.common import dequantize  # noqa: PLC0415
    from engine.model.quantization.packing import unpack_rows  # noqa: PLC0415

    codes = unpack_rows(layer.qweight, layer.wna16_bits).t()  # [out, in]
    if layer.perm is not None:
        x = x.index_select(-1, layer.perm)
    w = dequantize(codes, layer.zeros.t().float(), layer.scales.t().float(), None, x.dtype)
    return F.linear(x, w, bias)


def apply_lut(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SqueezeLLM through the same kernels (ops.triton.wna16_gemm.lut_gemm): `qweight` int32
    [in / 8, out] as stored, `lookup_table` [out, 16] fp16. [..., in] -> [..., out]."""
    from ops.triton.wna16_gemm import lut_dequantize, lut_gemm  # noqa: PLC0415

    qweight, table = layer.qweight, layer.lookup_table
    in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
    x2 = x.reshape(-1, in_features)  # [tokens, in]
    launch = _plan(x2.shape[0], in_features, out_features, in_features, x.get_device(), gemv=False)
    if launch.path == "dequant":
        out = torch.matmul(x2, lut_dequantize(qweight, table, 4, x.dtype))  # [in, out] weights
    else:
        out = lut_gemm(
            x2, qweight, table, 4, launch.block_m, launch.block_n, launch.block_k, launch.split_k,
            launch.num_warps, launch.num_stages,
        )  # fmt: skip
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out_features)
