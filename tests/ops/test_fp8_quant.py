"""The per-token FP8 activation quantizer against its torch spec (the lines it replaces in
engine.model.quantization.fp8._scaled_mm_linear, as torch computes them on CUDA), bit for bit, under
TRITON_INTERPRET=1 and on a GPU."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _spec(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # On CUDA torch divides by a Python scalar as a multiplication by its float32 reciprocal: written
    # out here, so the spec is the same on every device.
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(448.0, dtype=torch.float32)
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) * inv.to(x.device)  # [M, 1]
    return (x.float() * scale.reciprocal()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


@in_process
# ragged, a power of two, a wide row (each read once), a row past 16,384 (read twice)
@pytest.mark.parametrize(("m", "k"), [(3, 200), (5, 4096), (2, 5000), (2, 20000)])
def test_per_token_fp8_equals_the_torch_spec_bit_for_bit(m: int, k: int) -> None:
    from ops.triton.fp8_quant import per_token_fp8

    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, m)[:, None]  # rows of very different size
    x[0, : k // 3] = 0.0
    if m > 2:
        x[2] = 0.0  # an all-zero row: the 1e-12 floor
    x = x.to(torch.bfloat16).to(DEVICE)
    q, scale = per_token_fp8(x)
    q_ref, scale_ref = _spec(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k) and scale.shape == (m, 1)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
