"""Gemma's row kernels: gemma_rms_norm (scaling by 1 + weight in float32) and gelu_tanh_and_mul (GeGLU
with the tanh-approximate GELU). The references against transformers' own modules, then the Triton
kernels (ops/triton/rms_norm.py, activation.py with their GEMMA / GELU_TANH switches) against the
references under TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter)."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch

import ops.triton as impl
from ops import reference
from tests.ops.test_triton_kernels import TOL, poisoned_allocations, rel_err


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_are_transformers_gemma_modules(dtype: torch.dtype) -> None:
    """Bit for bit, in the model dtype: Gemma3RMSNorm after `residual + hidden`, and
    `gelu_pytorch_tanh(gate) * up`."""
    from transformers.activations import ACT2FN
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(2)
    norm = Gemma3RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    norm = norm.to(dtype)
    x, residual = (torch.randn(5, 96) * 3).to(dtype), torch.randn(5, 96).to(dtype)
    out, new_residual = reference.gemma_rms_norm(x, norm.weight, 1e-6, residual)
    with torch.no_grad():
        assert torch.equal(out, norm(residual + x)) and torch.equal(new_residual, residual + x)
        assert torch.equal(reference.gemma_rms_norm(x, norm.weight, 1e-6), norm(x))
    gate_up = (torch.randn(7, 96) * 3).to(dtype)
    expected = ACT2FN["gelu_pytorch_tanh"](gate_up[:, :48]) * gate_up[:, 48:]
    assert torch.equal(reference.gelu_tanh_and_mul(gate_up), expected)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gemma_rms_norm(dtype: torch.dtype, with_residual: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 96, dtype=dtype, device=DEVICE) * 3  # 96: not a power of two, exercises the mask
    weight = (torch.randn(96, device=DEVICE) * 0.5).to(dtype)  # around 0: the scale is 1 + weight
    residual = torch.randn(5, 96, dtype=dtype, device=DEVICE) if with_residual else None
    ref = reference.gemma_rms_norm(x, weight, 1e-6, residual)
    with poisoned_allocations():
        out = impl.gemma_rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        assert rel_err(out[0], ref[0]) < TOL[dtype] and torch.equal(out[1], ref[1])
    else:
        assert rel_err(out, ref) < TOL[dtype]
    plain = reference.rms_norm(x, weight, 1e-6, residual)
    assert rel_err(plain[0] if with_residual else plain, ref[0] if with_residual else ref) > 0.1  # 1 + w


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_tanh_and_mul(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = (torch.randn(7, 2 * 48, device=DEVICE) * 3).to(dtype)
    x[0, :4] = torch.tensor([-40.0, 40.0, 0.0, -1e-3], dtype=dtype)  # saturated tanh both ways, and 0
    ref = reference.gelu_tanh_and_mul(x)
    with poisoned_allocations():
        out = impl.gelu_tanh_and_mul(x)
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(reference.silu_and_mul(x), ref) > 0.05  # GELU, not SiLU
