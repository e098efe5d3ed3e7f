"""silu_and_mul Triton kernel: one read of [gate | up], one write of silu(gate) * up, in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [num_tokens, d]
    x_ptr,  # [num_tokens, 2 * d]
    stride_x,
    stride_out,
    d,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] holding [gate | up]; returns silu(gate) * up: [num_tokens, d]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, d)
    num_tokens = x2.shape[0]
    block = min(triton.next_power_of_2(d), 2048)
    if num_tokens > 0 and d > 0:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(d, block))](
            out2, x2, x2.stride(0), out2.stride(0), d, BLOCK=block, num_warps=4
        )
    return out
