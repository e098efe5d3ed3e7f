"""silu_and_mul Triton kernel: one read of [gate | up], one write of silu(gate) * up, in float32.

`silu_and_mul_fp8` also quantizes each row per token to FP8 for the W8A8 down projection that follows
(engine.model.quantization.fp8_activation): one program holds a whole row, so the 16-bit output is
neither written nor read back by the quantizer. Bit for bit `per_token_fp8(silu_and_mul(x))`.

`gelu_tanh_and_mul` (Gemma's GeGLU) is the same kernel with GELU_TANH on: the tanh-approximate GELU in
float32, rounded to x's dtype before the multiply, as torch rounds `gelu(gate)` before `* up`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.fp8_quant import (
    INV_FP8_MAX,
    MAX_ONE_BLOCK,
    hardware_fp8_conversion,
    per_token_fp8,
    store_row_fp8,
)
from ops.triton.pdl import let_next_kernel_start, pdl_enabled, wait_for_previous_kernel
from ops.triton.tanh import tanh


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [num_tokens, d]; float8_e4m3fn with QUANT
    scale_ptr,  # [num_tokens] float32 per-token scales (QUANT)
    x_ptr,  # [num_tokens, 2 * d]
    stride_x,
    stride_out,
    d,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL, and lets the next kernel launch early (ops.triton.pdl)
    QUANT: tl.constexpr,  # one program a row (BLOCK >= d): store it as FP8 with a per-token scale
    INV_FP8_MAX: tl.constexpr,
    HW_CVT: tl.constexpr,
    GELU_TANH: tl.constexpr = False,  # gelu_tanh(gate) * up instead of silu
):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:  # 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), rounded as torch's gelu output
        gelu = 0.5 * gate * (1.0 + tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
        out = gelu.to(x_ptr.dtype.element_ty).to(tl.float32) * up
    else:
        out = gate / (1.0 + tl.exp(-gate)) * up
    if QUANT:  # quantize what the plain kernel would have stored (x's dtype), as the quantizer reads it
        quantized = out.to(x_ptr.dtype.element_ty).to(tl.float32)
        store_row_fp8(
            quantized, out_ptr + row * stride_out + offs, mask, scale_ptr + row, INV_FP8_MAX, HW_CVT
        )
    else:
        tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK, programs per row) per d. Python ints only: valid for every batch size and across CUDA-graph
# capture and replay.
_LAUNCH: dict[int, tuple[int, int]] = {}


def _launch_params(d: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(d), 2048)
    params = (block, triton.cdiv(d, block))
    _LAUNCH[d] = params
    return params


def silu_and_mul(x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
    """x: [num_tokens, 2 * d] holding [gate | up]; returns silu(gate) * up: [num_tokens, d] (with
    `gelu_tanh`, gelu_tanh(gate) * up).

    The model's 2-D input takes no reshape and its output no view (host-bound eager path).
    """
    shape = x.shape
    d = shape[-1] // 2
    if len(shape) == 2 and x.stride()[1] == 1:
        x2 = x
    else:
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
    num_tokens = x2.shape[0]
    out = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)  # [num_tokens, d]
    if num_tokens > 0 and d > 0:
        block, programs_per_row = _LAUNCH.get(d) or _launch_params(d)
        # BLOCK and PDL passed positionally: a keyword costs a dict build per launch. out is contiguous.
        pdl = pdl_enabled(x.device)
        _silu_and_mul_kernel[(num_tokens, programs_per_row)](
            out, out, x2, x2.stride(0), d, d, block, pdl, False, INV_FP8_MAX, False, gelu_tanh,  # out: unused scale
            num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
    return out if len(shape) == 2 else out.view(*shape[:-1], d)


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [num_tokens, 2 * d] 16-bit -> (q [num_tokens, d] float8_e4m3fn, scales [num_tokens, 1] float32):
    silu(gate) * up quantized per token in the same launch (rows up to MAX_ONE_BLOCK wide; wider ones
    take the two kernels)."""
    num_tokens, width = x.shape
    d = width // 2
    if d > MAX_ONE_BLOCK:
        return per_token_fp8(silu_and_mul(x))
    x2 = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty(num_tokens, d, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)
    if num_tokens > 0 and d > 0:
        block = triton.next_power_of_2(d)
        pdl = pdl_enabled(x.device)
        _silu_and_mul_kernel[(num_tokens, 1)](
            q, scale, x2, x2.stride(0), d, d, block, pdl, True, INV_FP8_MAX, hardware_fp8_conversion(x), False,
            num_warps=8 if block <= 8192 else 16, launch_pdl=pdl,
        )  # fmt: skip
    return q, scale


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] holding [gate | up]; returns gelu_tanh(gate) * up: [num_tokens, d]
    (ops.reference.gelu_tanh_and_mul)."""
    return silu_and_mul(x, True)
