"""silu_and_mul Triton kernel: one read of [gate | up], one write of silu(gate) * up, in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.pdl import let_next_kernel_start, pdl_enabled, wait_for_previous_kernel


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [num_tokens, d]
    x_ptr,  # [num_tokens, 2 * d]
    stride_x,
    stride_out,
    d,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL, and lets the next kernel launch early (ops.triton.pdl)
):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK, programs per row) per d. Python ints only: valid for every batch size and across CUDA-graph
# capture and replay.
_LAUNCH: dict[int, tuple[int, int]] = {}


def _launch_params(d: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(d), 2048)
    params = (block, triton.cdiv(d, block))
    _LAUNCH[d] = params
    return params


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] holding [gate | up]; returns silu(gate) * up: [num_tokens, d].

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
            out, x2, x2.stride(0), d, d, block, pdl, num_warps=4, launch_pdl=pdl
        )
    return out if len(shape) == 2 else out.view(*shape[:-1], d)
