"""A few rows of x times a float weight on tensor cores: y [M, N] = x [M, K] @ weight [N, K]^T for M <= 16.

A decode step of 2-16 sequences reads every weight once, as batch 1 does, but the batch-1 GEMV
(ops/triton/fp8_gemv.py) multiplies on the CUDA cores and, past 4 rows, shares a weight tile between
row groups through L2: at 8 tokens it took 2.2-2.6x cuBLAS's time (H100, `9ae29e1`), so those steps
ran cuBLAS. cuBLAS reaches
0.92-0.97 of the copy bandwidth on an 8B model's MLP at 8 tokens but 0.75-0.82 on the attention side
(qkv, o: 21 and 7.7 us a launch, o in two kernels, a GEMM and its split-K reduction; K8 at `130880a`).

Here the weight is the wide operand ("swap AB"): each program owns BLOCK_N weight rows and a K range,
and multiplies [BLOCK_N, BLOCK_K] weight tiles by x^T [BLOCK_K, BLOCK_M] with tl.dot (BLOCK_M = 16, the
MMA's smallest, x's missing rows masked to zero), so BLOCK_N (64 or 128) is the MMA's long side and the
weight streams through the pipelined loads Triton builds for a dot loop (num_stages). K is split over
SPLIT_K programs per tile, summed by the tile's last program (ops.triton.split_k's tickets), so there
is no second launch.

FP8 weights (`weight_scale` given) are W8A16 here: each tile converted to x's dtype in registers, the
row's scale applied to the float32 sums, as ops/triton/fp8_gemv.py does on the CUDA cores (whether this
beats it is loadtest/sweep_gemv.py's `fp8_skinny`).

Not launched with PDL (ops/triton/pdl.py): letting the next kernel launch at its start and waiting before the
pipelined loop (x is loaded with each tile) made L1's batch-8 step slower on an H100 (e507e83: FP8 weights 4.47 ->
5.08 ms; the W4A16 skinny GEMM's GPTQ step 3.71 -> 4.04; loadtest/results/decode-attn-h100-2026-12-07-e507e83/).

The spec is F.linear in float32 (tests/ops/test_skinny_gemm.py); sums are float32. Float32 operands
multiply in IEEE float32 (no TF32), so a float32 model decodes the same tokens through it as through
torch (the GPU engine check's tiny models, with WEIR_SKINNY_GEMM_LAUNCHES giving every shape a launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.split_k import MAX_TILES, k_splits, split_counters, store_swapped_tile

MAX_SKINNY_ROWS = 16  # rows of x: one MMA tile
# (block_n, block_k, split_k > 1, num_stages, FP8 weights) -> the compiled kernel's shared memory in bytes, as
# launched (for loadtest/sweep_gemv.py: past 48 KB Triton opts the kernel into oversized shared memory)
SHARED_BYTES: dict[tuple[int, int, bool, int, bool], int] = {}


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]: x's dtype, or float8 (then scaled per row)
    scale_ptr,  # [N] float32: each weight row's scale (read when SCALED)
    out_ptr,  # [M, N]
    partials_ptr,  # [SPLIT_K, M, N] float32 (SPLIT_K > 1)
    counters_ptr,  # [tiles] int32, zero between launches
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 (exact, as the CPU reference), else the MMA's own
    SCALED: tl.constexpr,  # FP8 weights: y = x (w * scale[:, None])^T, the scale applied to the sums
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K] at K = 0
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M]: x^T at K = 0
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T's tile
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = k0 + offs_k < k_end
        w = tl.load(w_ptrs + k0, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        xt = tl.load(x_ptrs + k0, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[:, None] if SCALED else 1.0  # [BLOCK_N, 1]
    store_swapped_tile(acc, out_ptr, partials_ptr, counters_ptr, pid_n, offs_m, offs_n, M, N, stride_om, pid_k,
                       SPLIT_K, scale)  # fmt: skip


def skinny_gemm(
    x: torch.Tensor,  # [M, K], 1 <= M <= MAX_SKINNY_ROWS; bf16 / fp16 (float32: exact but slow, for checks)
    weight: torch.Tensor,  # [N, K], x's dtype, or float8_e4m3fn with weight_scale
    weight_scale: torch.Tensor | None = None,  # [N] float32: an FP8 weight's per-row scales
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:  # [M, N] in x.dtype
    """y = x weight^T in one launch (an FP8 weight: x (weight * weight_scale[:, None])^T, W8A16: its tiles
    converted to x's dtype in registers); split_k > 1 splits K over that many programs per BLOCK_N rows."""
    M, K = x.shape
    N = weight.shape[0]
    if not 1 <= M <= MAX_SKINNY_ROWS:
        raise ValueError(f"skinny_gemm takes 1 to {MAX_SKINNY_ROWS} rows of x; got {M}")
    scaled = weight_scale is not None
    if weight.shape[1] != K or (weight.dtype != x.dtype and not scaled):
        raise ValueError(
            f"skinny_gemm: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
        )
    if scaled and (weight.dtype != torch.float8_e4m3fn or weight_scale.shape != (N,)):
        raise ValueError(
            f"skinny_gemm: a scaled weight is float8_e4m3fn with [N] scales; got {weight.dtype}, "
            f"scale {tuple(weight_scale.shape)}"
        )
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("skinny_gemm: weight and x must be contiguous along K")
    k_per_split, split_k = k_splits(K, split_k, block_k)  # no empty split
    tiles = triton.cdiv(N, block_n)
    if split_k > 1 and tiles > MAX_TILES:
        raise ValueError(f"skinny_gemm: {tiles} tiles exceed the split-K workspace ({MAX_TILES})")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    partials = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if split_k > 1 else out
    kernel = _skinny_gemm_kernel[(tiles, split_k)](
        x, weight, weight_scale if scaled else x, out, partials, split_counters(x.device), M, N, K, k_per_split,
        x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=MAX_SKINNY_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SCALED=scaled,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    shared = getattr(getattr(kernel, "metadata", None), "shared", None)
    if shared is not None:
        SHARED_BYTES[(block_n, block_k, split_k > 1, num_stages, scaled)] = int(shared)
    return out
