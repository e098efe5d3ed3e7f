"""The FP8 / float-weight GEMV with an RMSNorm folded into its input (ops/folded_norm.py): against the norm
kernel (ops/triton/rms_norm.py, with the residual add) then the same GEMV, under TRITON_INTERPRET=1 without a
GPU, and in float32 against the norm's spec (reference.rms_norm). FP8 and float weights, gated, ragged N and
K, K splits (launched twice: counters come back clean), bf16 rows (the norm's two roundings to x's dtype;
the interpreter's casts truncate where the GPU's round to nearest, so bf16 compares kernel with kernel) and
float32; the residual stored once, by the first tile's programs, and the old residual left as it was."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch

from ops.folded_norm import ResidualNorm, apply_residual_norm


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _weights(n: int, k: int, fp8: bool, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if fp8:
        weight = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        return weight.to(DEVICE), (torch.rand(n, generator=gen) * 0.01 + 1e-4).to(DEVICE)
    return (torch.randn(n, k, generator=gen) * 0.05).to(DEVICE, dtype), torch.ones(n, device=DEVICE)


# (n, k, block_n, block_k, split_k, gated): whole tiles; ragged N and K; K split unevenly; gated with a split
CASES = [
    (32, 256, 4, 64, 1, False),
    (21, 320, 4, 64, 3, False),
    (40, 192, 8, 64, 2, True),
    (16, 128, 4, 128, 1, True),
]


@in_process
@pytest.mark.parametrize(("n", "k", "block_n", "block_k", "split_k", "gated"), CASES)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_with_the_norm_folded_in_is_the_norm_then_the_gemv(
    n: int, k: int, block_n: int, block_k: int, split_k: int, gated: bool, fp8: bool, dtype: torch.dtype
) -> None:
    from ops.triton.fp8_gemv import fp8_gemv

    gen = torch.Generator().manual_seed(n * 7 + k)
    x = (torch.randn(1, k, generator=gen) * 3).to(DEVICE, dtype)  # the sub-layer's output
    residual = torch.randn(1, k, generator=gen).to(DEVICE, dtype)
    norm_weight = (torch.rand(k, generator=gen) + 0.5).to(DEVICE, dtype)
    weight, scale = _weights(n, k, fp8, dtype, seed=k)
    from ops.triton.rms_norm import rms_norm

    launch = dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=1, gated=gated)
    normed, expected_residual = rms_norm(x, norm_weight, 1e-5, residual)  # the two launches it replaces
    expected = fp8_gemv(normed, weight, scale, **launch)
    if dtype == torch.float32:  # the spec: no rounding in the way, so the same within float32's ulps
        spec_residual = torch.empty_like(x)
        spec = fp8_gemv(apply_residual_norm(x, ResidualNorm(residual, norm_weight, 1e-5, spec_residual)),
                        weight, scale, **launch)  # fmt: skip
        assert torch.equal(spec_residual, expected_residual)
        torch.testing.assert_close(spec, expected, rtol=1e-5, atol=1e-6)
    residual_before = residual.clone()
    for prefetch in (False, True):
        for _ in range(2):
            new_residual = torch.full_like(x, float("nan"))
            norm = ResidualNorm(residual, norm_weight, 1e-5, new_residual)
            out = fp8_gemv(x, weight, scale, **launch, prefetch=prefetch, norm=norm)
            assert out.shape == expected.shape and out.dtype == dtype
            assert torch.equal(new_residual, expected_residual)  # x + residual, every column once
            assert torch.equal(residual, residual_before)
            # 1 / rms summed in another order: float32 ulps (bf16 rows: a rare rounding flip in one column)
            torch.testing.assert_close(
                out, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5
            )


@in_process
def test_the_folded_norm_rounds_where_the_norm_kernel_does() -> None:
    """bf16 rows: the folded GEMV's output is the GEMV of the norm kernel's bf16 output (rounded twice, before
    and after the weight), not of the unrounded norm."""
    from ops.triton.fp8_gemv import fp8_gemv
    from ops.triton.rms_norm import rms_norm

    gen = torch.Generator().manual_seed(3)
    k = 256
    x = (torch.randn(1, k, generator=gen) * 3).bfloat16().to(DEVICE)
    residual = torch.randn(1, k, generator=gen).bfloat16().to(DEVICE)
    norm_weight = (torch.rand(k, generator=gen) + 0.5).bfloat16().to(DEVICE)
    weight = torch.randn(64, k, generator=gen).bfloat16().to(DEVICE)
    norm = ResidualNorm(residual, norm_weight, 1e-6, torch.empty_like(x))
    out = fp8_gemv(x, weight, torch.ones(64, device=DEVICE), block_n=4, block_k=64, num_warps=1, norm=norm)
    h = x.float() + residual.float()
    rounded = rms_norm(x, norm_weight, 1e-6, residual)[0].float()  # [1, k]
    unrounded = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight.float()
    assert not torch.equal(rounded, unrounded)
    exact = rounded @ weight.float().T  # [1, 64]
    # within the output's own rounding to bf16 (2^-8 of each value; 2^-7 where the interpreter truncates)
    assert ((out.float() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()
    off_rounded = (out.float() - exact).norm()
    off_unrounded = (out.float() - unrounded @ weight.float().T).norm()
    assert off_rounded < off_unrounded / 2, (off_rounded, off_unrounded)


@in_process
def test_the_folded_norm_is_refused_where_the_gemv_cannot_apply_it() -> None:
    from ops.triton.fp8_gemv import fp8_gemv

    weight, scale = _weights(16, 64, True, torch.float32, seed=1)
    x = torch.randn(2, 64, device=DEVICE)
    norm = ResidualNorm(
        torch.randn(2, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-5, torch.empty(2, 64)
    )
    with pytest.raises(
        ValueError, match="fp8_gemv: norm takes one row and no static input scale; got 2 rows"
    ):
        fp8_gemv(x, weight, scale, block_n=4, block_k=64, norm=norm)
    x1 = x[:1]
    bad = ResidualNorm(x1.clone(), torch.ones(32, device=DEVICE), 1e-5, torch.empty_like(x1))
    with pytest.raises(
        ValueError, match=r"norm's residual \(1, 64\), new residual \(1, 64\) and weight \(32,\)"
    ):
        fp8_gemv(x1, weight, scale, block_n=4, block_k=64, norm=bad)


@in_process
@pytest.mark.parametrize("gated", [False, True])
def test_the_one_pass_fold_scales_the_sums_by_one_over_rms(gated: bool) -> None:
    """norm_one_pass (the probe's experiment): W ((x + r) * g) summed unrounded, then times 1 / rms: in float32
    the norm's spec within float32's ulps, the residual stored the same; split_k other than 1 refused."""
    from ops.triton.fp8_gemv import fp8_gemv

    gen = torch.Generator().manual_seed(11)
    k = 320
    x, residual = torch.randn(1, k, generator=gen).to(DEVICE) * 3, torch.randn(1, k, generator=gen).to(DEVICE)
    norm_weight = (torch.rand(k, generator=gen) + 0.5).to(DEVICE)
    weight, scale = _weights(24, k, True, torch.float32, seed=4)
    launch = dict(block_n=4, block_k=64, num_warps=1, gated=gated)
    spec_residual = torch.empty_like(x)
    normed = apply_residual_norm(x, ResidualNorm(residual, norm_weight, 1e-5, spec_residual))
    expected = fp8_gemv(normed, weight, scale, **launch)
    new_residual = torch.empty_like(x)
    norm = ResidualNorm(residual, norm_weight, 1e-5, new_residual)
    out = fp8_gemv(x, weight, scale, **launch, norm=norm, norm_one_pass=True)
    assert torch.equal(new_residual, spec_residual)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fp8_gemv: norm_one_pass needs a norm and split_k 1; got split_k 2"):
        fp8_gemv(x, weight, scale, **{**launch, "split_k": 2}, norm=norm, norm_one_pass=True)


@in_process
@pytest.mark.parametrize("gated", [False, True])
def test_an_unquantized_layer_folds_the_norm_only_where_its_gemv_runs(gated: bool) -> None:
    """UnquantizedLinearMethod.apply_folded_norm: inside CUDA-graph capture (`decode_gemv_allowed`) a layer
    with a planned one-token launch runs the folded GEMV (the norm then the linear, SiLU-mul where gated);
    eager, or without a plan, it declines (None) and leaves the norm unconsumed for `materialize`."""
    import torch.nn.functional as F
    from torch import nn

    from engine.model.layers.folded_norm import FoldedNorm
    from engine.model.layers.norm import RMSNorm
    from engine.model.quantization.float_gemv import decode_gemv_allowed
    from engine.model.quantization.unquantized import UnquantizedLinearMethod

    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(128, 1e-6, torch.float32, prefix="norm")
    norm.weight.data = (torch.rand(128, generator=gen) + 0.5).to(DEVICE)
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randn(48, 128, generator=gen).to(DEVICE), requires_grad=False)
    plan = {"block_n": 8, "block_k": 64, "split_k": 1}
    layer.float_gemv, layer.float_gemv_gated = (None, plan) if gated else (plan, None)
    layer.float_gemv_scale = torch.ones(48, device=DEVICE)
    x, residual = torch.randn(1, 128, generator=gen).to(DEVICE), torch.randn(1, 128, generator=gen).to(DEVICE)
    method = UnquantizedLinearMethod()
    eager = FoldedNorm(x, residual, norm)
    assert method.apply_folded_norm(layer, eager, None, gated) is None
    assert method.apply_folded_norm(layer, eager, None, not gated) is None  # no plan for the other kind
    with pytest.raises(RuntimeError, match="never applied"):
        eager.new_residual()
    folded = FoldedNorm(x, residual, norm)
    with decode_gemv_allowed():
        out = method.apply_folded_norm(layer, folded, None, gated)
    normed = apply_residual_norm(x, ResidualNorm(residual, norm.weight, 1e-6, torch.empty_like(x)))
    y = F.linear(normed, layer.weight)
    expected = F.silu(y[:, :24]) * y[:, 24:] if gated else y
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(folded.new_residual(), (x + residual))
