"""Per-token FP8 quantization of activations in one kernel: x [M, K] (bf16) -> x_q [M, K] float8_e4m3fn
and scales [M, 1] float32, with scale = max(amax(|x[m]|), 1e-12) * float32(1 / 448) and
x_q = fp8(x * (1 / scale)).

The torch version (engine.model.quantization.fp8._scaled_mm_linear on CPU, and the spec here) takes
five launches and writes float32 copies of x: on an 8,192-token prefill step of an 8B model about
0.7 GB of traffic per linear, against under 0.1 GB here (one read of x and one fp8 write). Bit for bit the torch lines on CUDA: there torch divides a tensor by a Python scalar as a
multiplication by the float32 reciprocal (so the scale is amax * float32(1/448), one ulp off a true
division now and then: the first GPU run of this kernel, with div_rn, failed on exactly that); x is
multiplied by the row's IEEE reciprocal of its scale (torch: `reciprocal()`, here one div_rn a row; a
division per element cost more than the memory traffic: 18.5 ms of a 141 ms FP8 prefill step of
8,192 tokens at bfa3680, H200); round-to-nearest-even to fp8, by the GPU's saturating conversion, or
under the interpreter in float32 arithmetic (ops.triton.kv_cache._round_to_fp8), whose own cast drops
carries. Rows up to 16,384 wide (every linear input of an 8B model) are read once, into registers.

Used by `_scaled_mm_linear` on CUDA for dynamic (per-token) scales; WEIR_FP8_QUANT_KERNEL=0 keeps the
torch lines. Its first GPU run (H200, 1829d99) failed to compile (a plain global read in the kernel,
which the interpreter allows); tests/ops/test_kernels_compile.py now compiles it for sm_90 on CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ops.triton.kv_cache import _round_to_fp8

FP8_MAX = tl.constexpr(448.0)  # float8_e4m3fn's largest value (a constexpr: read inside the kernels)

INV_FP8_MAX = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(FP8_MAX.value, dtype=torch.float32))


@triton.jit
def _per_token_fp8_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # [M, K] float8_e4m3fn
    scale_ptr,  # [M] float32
    K,
    stride_x,
    stride_q,
    INV_FP8_MAX: tl.constexpr,  # float32(1 / 448), as torch's CUDA division by a scalar uses it
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # K <= BLOCK: the row is read once and kept in registers
    HW_CVT: tl.constexpr,  # the GPU's fp8 conversion (round to nearest even, saturating); else in software
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_BLOCK:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        store_row_fp8(x, q_row + offs, mask, scale_ptr + row, INV_FP8_MAX, HW_CVT)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) * INV_FP8_MAX
        tl.store(scale_ptr + row, scale)
        inv = tl.math.div_rn(1.0, scale)
        for k0 in range(0, K, BLOCK):  # the row again, from L2
            mask = k0 + offs < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            q = _to_fp8(x * inv, HW_CVT)
            tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_row_fp8(x, q_ptrs, mask, scale_ptr, INV_FP8_MAX: tl.constexpr, HW_CVT: tl.constexpr):
    """Quantize one row held in registers ([BLOCK] float32, masked lanes 0) with its own scale and store
    both: the per-token arithmetic above, shared with the kernels that fuse it (RMSNorm, SiLU-mul)."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) * INV_FP8_MAX
    tl.store(scale_ptr, scale)
    q = _to_fp8(x * tl.math.div_rn(1.0, scale), HW_CVT)
    tl.store(q_ptrs, q.to(tl.float8e4nv), mask=mask)


@triton.jit
def _to_fp8(x, HW_CVT: tl.constexpr):
    """float32 -> float8_e4m3fn, nearest even, saturating at +-448 (the spec clamps, then casts)."""
    if HW_CVT:
        return tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX).to(tl.float8e4nv)
    # Rounded exactly first (the interpreter's own cast drops carries); the cast is then exact.
    return _round_to_fp8(x, 3, -6, FP8_MAX).to(tl.float8e4nv)


MAX_ONE_BLOCK = 16384  # widest row kept in registers (64 floats a thread at 8 warps)


def hardware_fp8_conversion(x: torch.Tensor) -> bool:
    """Whether kernels on x's device convert to fp8 in hardware (CUDA, not the interpreter)."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q [M, K] float8_e4m3fn, scales [M, 1] float32), as the torch spec computes them."""
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M > 0:
        one_block = K <= MAX_ONE_BLOCK
        block = triton.next_power_of_2(K) if one_block else 4096
        hw_cvt = hardware_fp8_conversion(x)
        _per_token_fp8_kernel[(M,)](
            x, q, scale, K, x.stride(0), q.stride(0), INV_FP8_MAX, block, one_block, hw_cvt,
            num_warps=8 if block <= 8192 else 16,
        )  # fmt: skip
    return q, scale
