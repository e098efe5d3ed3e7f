"""RMSNorm Triton kernel, with the residual add fused in (one read of x and residual, one write of each
output). Same signature and rounding points as `ops.reference.rms_norm`.

`rms_norm_fp8` also quantizes the output per token to FP8 for a W8A8 linear that follows
(engine.model.quantization.fp8_activation): the row is already in registers, so the quantizer's own
read of it, and the 16-bit write it would read, go. Bit for bit `per_token_fp8(rms_norm(...))`.

`gemma_rms_norm` is the same kernel with GEMMA on: the norm reads the residual sum as stored (rounded to
x's dtype) and scales by (1 + weight) in float32 before its one rounding (`ops.reference.gemma_rms_norm`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.fp8_quant import INV_FP8_MAX, hardware_fp8_conversion, store_row_fp8
from ops.triton.pdl import let_next_kernel_start, pdl_enabled, wait_for_previous_kernel


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_tokens, hidden]; float8_e4m3fn with QUANT
    scale_ptr,  # [num_tokens] float32 per-token scales (QUANT)
    new_residual_ptr,  # [num_tokens, hidden]; unused without residual
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden]; unused without residual
    weight_ptr,  # [hidden]
    stride_x,
    stride_r,
    stride_out,
    stride_new_r,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL, and lets the next kernel launch early (ops.triton.pdl)
    QUANT: tl.constexpr,  # store the output as FP8 with a per-token scale
    INV_FP8_MAX: tl.constexpr,
    HW_CVT: tl.constexpr,
    GEMMA: tl.constexpr = False,  # Gemma's norm: the rounded sum, (1 + weight) in float32, one rounding
):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = h + r.to(tl.float32)
        tl.store(new_residual_ptr + row * stride_new_r + offs, h.to(x.dtype), mask=mask)
        if GEMMA:
            h = h.to(x.dtype).to(tl.float32)
    variance = tl.sum(h * h, axis=0) / hidden
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    if GEMMA:
        out = h * tl.rsqrt(variance + eps) * (1.0 + w.to(tl.float32))
    else:
        normed = (h * tl.rsqrt(variance + eps)).to(x.dtype)  # the reference rounds before the weight multiply
        out = normed.to(tl.float32) * w.to(tl.float32)
    if QUANT:  # quantize what the plain kernel would have stored (x's dtype), as the quantizer reads it
        quantized = out.to(x.dtype).to(tl.float32)
        store_row_fp8(
            quantized, out_ptr + row * stride_out + offs, mask, scale_ptr + row, INV_FP8_MAX, HW_CVT
        )
    else:
        tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# Launch constants per hidden size: (BLOCK, num_warps). Keyed on one python int, so an entry is valid for
# every batch size and dtype, and during CUDA-graph capture and replay alike (no tensor is cached).
_LAUNCH: dict[int, tuple[int, int]] = {}


def _launch_params(hidden: int) -> tuple[int, int]:
    block = triton.next_power_of_2(hidden)
    params = (block, min(max(block // 512, 1), 16))
    _LAUNCH[hidden] = params
    return params


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
    gemma: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with `residual`, first adds it and also returns the sum (the next residual).

    Eager forwards are host-bound, so the model's case (2-D rows contiguous in hidden) takes no reshape
    and no view: outputs are allocated 2-D from ints and their row stride is known to be `hidden`.
    """
    shape = x.shape
    hidden = shape[-1]
    block, num_warps = _LAUNCH.get(hidden) or _launch_params(hidden)
    x2 = x if len(shape) == 2 and x.stride()[1] == 1 else _rows(x)  # [num_tokens, hidden]
    num_tokens = x2.shape[0]
    out_dtype = x.dtype if gemma or weight.dtype == x.dtype else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=x.device)  # [num_tokens, hidden]
    if residual is not None:
        r2 = residual if residual.dim() == 2 and residual.stride()[1] == 1 else _rows(residual)
        new_residual = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)  # [num_tokens, hidden]
        nr2 = new_residual
    else:
        r2, nr2 = x2, out  # placeholders; the kernel does not touch them
    if num_tokens > 0:
        pdl = pdl_enabled(x.device)
        # Constexprs passed positionally (HAS_RESIDUAL, BLOCK, PDL): keywords cost a dict build per launch.
        _rms_norm_kernel[(num_tokens,)](
            out, out, nr2, x2, r2, weight.contiguous(),
            x2.stride(0), r2.stride(0), hidden, hidden,  # out and new_residual are contiguous
            hidden, eps,
            residual is not None, block, pdl, False, INV_FP8_MAX, False, gemma,
            num_warps=num_warps, launch_pdl=pdl,
        )  # fmt: skip
    if len(shape) != 2:
        out = out.view(shape)
        if residual is not None:
            new_residual = new_residual.view(shape)
    if residual is not None:
        return out, new_residual
    return out


def rms_norm_fp8(
    x: torch.Tensor,  # [num_tokens, hidden] 16-bit, contiguous rows
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, ...]:
    """(q [num_tokens, hidden] float8_e4m3fn, scales [num_tokens, 1] float32[, the new residual]): the
    normed rows quantized per token, in the same launch."""
    num_tokens, hidden = x.shape
    if x.stride(1) != 1 or weight.dtype != x.dtype or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm_fp8: contiguous rows, and a weight of x's dtype")
    block, num_warps = _LAUNCH.get(hidden) or _launch_params(hidden)
    q = torch.empty(num_tokens, hidden, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else None
    r2, nr2 = (residual, new_residual) if residual is not None else (x, x)  # placeholders without residual
    if num_tokens > 0:
        pdl = pdl_enabled(x.device)
        _rms_norm_kernel[(num_tokens,)](
            q, scale, nr2, x, r2, weight.contiguous(),
            x.stride(0), r2.stride(0), hidden, hidden,
            hidden, eps,
            residual is not None, block, pdl, True, INV_FP8_MAX, hardware_fp8_conversion(x), False,
            num_warps=num_warps, launch_pdl=pdl,
        )  # fmt: skip
    return (q, scale) if new_residual is None else (q, scale, new_residual)


def gemma_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]: scales by (1 + weight)
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gemma's RMSNorm (see ops.reference.gemma_rms_norm); outputs in x's dtype."""
    return rms_norm(x, weight, eps, residual, True)
