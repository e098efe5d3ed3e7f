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


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _within_one_fp8_step(
    q: torch.Tensor, scale: torch.Tensor, spec_q: torch.Tensor, spec_scale: torch.Tensor
) -> None:
    """Dequantized, q agrees with the torch spec's within one e4m3 step (3 mantissa bits: 1/8 relative;
    near zero a few subnormal steps of the row's scale): the spec's norm or SiLU rounds differently."""
    torch.testing.assert_close(scale, spec_scale, rtol=3e-2, atol=0)  # the amax element rounds too
    deq, spec_deq = q.float() * scale, spec_q.float() * spec_scale
    assert ((deq - spec_deq).abs() <= 0.125 * spec_deq.abs() + 2.0**-6 * spec_scale).all()


@in_process
@pytest.mark.parametrize("hidden", [96, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_equals_the_two_kernels_bit_for_bit(hidden: int, with_residual: bool) -> None:
    """The fused norm + quantizer stores what rms_norm then per_token_fp8 store, and the same residual;
    and the torch spec (ops.reference.rms_norm_fp8) agrees within one fp8 step."""
    from ops import reference
    from ops.triton.fp8_quant import per_token_fp8
    from ops.triton.rms_norm import rms_norm, rms_norm_fp8

    gen = torch.Generator().manual_seed(hidden + with_residual)
    x = (torch.randn(4, hidden, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(torch.bfloat16).to(DEVICE)
    residual = torch.randn(4, hidden, generator=gen).to(torch.bfloat16).to(DEVICE) if with_residual else None
    fused = rms_norm_fp8(x, weight, 1e-5, residual)
    plain = rms_norm(x, weight, 1e-5, residual)
    normed = plain[0] if with_residual else plain
    q_ref, scale_ref = per_token_fp8(normed)
    assert torch.equal(_bits(fused[0]), _bits(q_ref)) and torch.equal(fused[1], scale_ref)
    if with_residual:
        assert torch.equal(fused[2], plain[1])
    spec = reference.rms_norm_fp8(x, weight, 1e-5, residual)
    _within_one_fp8_step(fused[0].cpu(), fused[1].cpu(), spec[0].cpu(), spec[1].cpu())


@in_process
@pytest.mark.parametrize("d", [100, 2048])
def test_silu_and_mul_fp8_equals_the_two_kernels_bit_for_bit(d: int) -> None:
    """The fused SiLU-mul + quantizer (one program a row) stores what silu_and_mul (its own programs
    per row) then per_token_fp8 store; the torch spec, which rounds silu before the multiply, is within
    one fp8 step of it."""
    from ops import reference
    from ops.triton.activation import silu_and_mul, silu_and_mul_fp8
    from ops.triton.fp8_quant import per_token_fp8

    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(3, 2 * d, generator=gen) * 2).to(torch.bfloat16).to(DEVICE)
    q, scale = silu_and_mul_fp8(x)
    q_ref, scale_ref = per_token_fp8(silu_and_mul(x))
    assert q.shape == (3, d) and scale.shape == (3, 1)
    assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(scale, scale_ref)
    spec_q, spec_scale = reference.silu_and_mul_fp8(x)
    _within_one_fp8_step(q.cpu(), scale.cpu(), spec_q.cpu(), spec_scale.cpu())


def test_reference_quantizer_equals_the_written_out_spec_and_runs_inside_cuda_graph_capture() -> None:
    """ops.reference.per_token_fp8 (the W8A8 path's torch quantizer when the Triton one is off) is the
    spec above bit for bit; on CUDA it is also captured into a graph (an earlier version copied a CPU
    tensor to the device per call, which capture refuses) and replays to the same bits."""
    from ops.reference import per_token_fp8

    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 300, generator=gen) * torch.logspace(-2, 2, 4)[:, None]).to(torch.bfloat16).to(DEVICE)
    q_ref, scale_ref = _spec(x)
    q, scale = per_token_fp8(x)
    assert torch.equal(scale, scale_ref) and torch.equal(_bits(q), _bits(q_ref))
    if DEVICE != "cuda":
        return
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_graph, scale_graph = per_token_fp8(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(scale_graph, scale_ref) and torch.equal(_bits(q_graph), _bits(q_ref))
