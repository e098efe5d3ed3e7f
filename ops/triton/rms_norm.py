"""RMSNorm Triton kernel, with the residual add fused in (one read of x and residual, one write of each
output). Same signature and rounding points as `ops.reference.rms_norm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_tokens, hidden]
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
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = h + r.to(tl.float32)
        tl.store(new_residual_ptr + row * stride_new_r + offs, h.to(x.dtype), mask=mask)
    variance = tl.sum(h * h, axis=0) / hidden
    normed = (h * tl.rsqrt(variance + eps)).to(x.dtype)  # the reference rounds before the weight multiply
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with `residual`, first adds it and also returns the sum (the next residual)."""
    hidden = x.shape[-1]
    x2 = _rows(x)
    num_tokens = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out2 = out.view(-1, hidden)
    if residual is not None:
        r2 = _rows(residual)
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        nr2 = new_residual.view(-1, hidden)
    else:
        r2, nr2 = x2, out2  # placeholders; the kernel does not touch them
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 512, 1), 16)
    if num_tokens > 0:
        _rms_norm_kernel[(num_tokens,)](
            out2,
            nr2,
            x2,
            r2,
            weight.contiguous(),
            x2.stride(0),
            r2.stride(0),
            out2.stride(0),
            nr2.stride(0),
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=num_warps,
        )
    if residual is not None:
        return out, new_residual
    return out
