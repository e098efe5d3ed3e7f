"""The gated decode GEMVs (a [gate; up] projection with silu(gate) * up in its own epilogue, so the MLP's
activation needs no launch at decode batches) against F.linear then SiLU-mul, under TRITON_INTERPRET=1
without a GPU: the FP8 / float-weight GEMV and the W4A16 / W8A16 GEMV, with ragged halves, K splits
(launched twice: the split counters must come back clean) and row groups; then the layer-level choice
(MergedColumnParallelLinear.silu_mul) and the MLP's use of it."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch
import torch.nn.functional as F

from engine.model.quantization.common import dequantize
from engine.model.quantization.packing import pack_rows


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _dtype() -> torch.dtype:
    return torch.float32 if DEVICE == "cpu" else torch.bfloat16


def _silu_mul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K], weight [2 H, K] (gate rows, then up rows), float32 -> [M, H]."""
    y = F.linear(x.float(), weight.float())
    half = weight.shape[0] // 2
    return F.silu(y[:, :half]) * y[:, half:]


def _err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double().cpu() - expected.double().cpu()).norm() / expected.double().cpu().norm()).item()


# (m, half, k, block_n, block_k, split_k): whole tiles, a ragged last tile (half not a multiple of
# block_n / 2), K splits with an uneven last split, two row groups
FLOAT_CASES = [(1, 24, 256, 8, 64, 1), (1, 21, 320, 8, 64, 3), (2, 16, 128, 4, 64, 2), (6, 12, 192, 4, 64, 1)]


@in_process
@pytest.mark.parametrize(("m", "half", "k", "block_n", "block_k", "split_k"), FLOAT_CASES)
@pytest.mark.parametrize("fp8", [False, True])
def test_fp8_gemv_gated_is_silu_of_gate_times_up(
    m: int, half: int, k: int, block_n: int, block_k: int, split_k: int, fp8: bool
) -> None:
    from ops.triton.fp8_gemv import fp8_gemv

    gen = torch.Generator().manual_seed(m * 100 + half + k)
    if fp8:
        weight = (torch.randn(2 * half, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = torch.rand(2 * half, generator=gen) * 0.01 + 1e-4
        dense = weight.float() * scale[:, None]
    else:  # the float GEMV of an unquantized layer: the weight itself, unit scales
        weight = (torch.randn(2 * half, k, generator=gen) * 0.1).to(_dtype())
        scale = torch.ones(2 * half)
        dense = weight.float()
    x = torch.randn(m, k, generator=gen).to(DEVICE, _dtype())
    expected = _silu_mul_reference(x.float().cpu(), dense)
    for prefetch in (False, True):
        for _ in range(2):
            out = fp8_gemv(x, weight.to(DEVICE), scale.to(DEVICE), None, block_n, block_k, split_k,
                           prefetch=prefetch, gated=True)  # fmt: skip
            assert out.shape == (m, half) and out.dtype == x.dtype
            assert _err(out, expected) < (1e-5 if _dtype() == torch.float32 else 1e-2), prefetch


# (bits, group_size, m, half, k, block_n, block_k, split_k)
WNA16_CASES = [
    (4, 32, 1, 32, 128, 16, 32, 1),
    (4, 64, 1, 20, 256, 8, 64, 2),  # split-K
    (4, 64, 1, 18, 256, 8, 64, 4),  # ragged: 18 columns in tiles of 4
    (8, 32, 3, 12, 96, 8, 32, 3),
    (4, 64, 6, 16, 256, 16, 64, 2),
]


@in_process
@pytest.mark.parametrize(
    ("bits", "group_size", "m", "half", "k", "block_n", "block_k", "split_k"), WNA16_CASES
)
def test_wna16_gemv_gated_is_silu_of_gate_times_up(
    bits: int, group_size: int, m: int, half: int, k: int, block_n: int, block_k: int, split_k: int
) -> None:
    from ops.triton.wna16_gemv import wna16_gemv

    gen = torch.Generator().manual_seed(bits * 1000 + half + m)
    n, groups = 2 * half, k // group_size
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen)  # [K, N]: gate columns, then up columns
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen).float()
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half().float()
    weight = dequantize(codes.t().to(torch.uint8), zeros.t(), scales.t(), None, torch.float32)  # [N, K]
    x = torch.randn(m, k, generator=gen).to(DEVICE, _dtype())
    expected = _silu_mul_reference(x.float().cpu(), weight)
    args = (
        pack_rows(codes, bits).to(DEVICE),
        scales.to(DEVICE, torch.float16),
        zeros.to(DEVICE, torch.float16),
    )
    for _ in range(2):
        out = wna16_gemv(x, *args, bits, group_size, block_n, block_k, split_k, gated=True)
        assert out.shape == (m, half) and out.dtype == x.dtype
        assert _err(out, expected) < (1e-5 if _dtype() == torch.float32 else 1e-2)


@in_process
def test_gated_launches_refuse_odd_shapes() -> None:
    from ops.triton.fp8_gemv import fp8_gemv
    from ops.triton.wna16_gemv import wna16_gemv

    x = torch.zeros(1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="gated needs an even row count and block_n; got 7 rows, block_n 4"):
        fp8_gemv(x, torch.zeros(7, 64, device=DEVICE), torch.ones(7, device=DEVICE), None, 4, 64, gated=True)
    qweight = torch.zeros(8, 24, dtype=torch.int32, device=DEVICE)
    scales = torch.zeros(2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="gated needs an even column count and block_n; got 24, block_n 5"):
        wna16_gemv(x, qweight, scales, scales, 4, 32, block_n=5, block_k=32, gated=True)


def _gate_up(bias: bool = False, sizes: tuple[int, int] = (24, 24)):  # noqa: ANN202
    from engine.model.layers.linear import MergedColumnParallelLinear

    gen = torch.Generator().manual_seed(3)
    layer = MergedColumnParallelLinear(192, list(sizes), bias=bias, params_dtype=_dtype()).to(DEVICE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.1)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@in_process
def test_merged_linear_silu_mul_takes_the_gated_gemv_only_where_planned() -> None:
    """An unquantized [gate, up] layer with a gated launch (the planner's table is Llama-3-8B's shape
    on CUDA; set here) gives silu(gate) * up at one token inside graph capture, and None (forward then
    the activation kernel) for two tokens, eagerly, with a bias, or with halves of unequal size."""
    from engine.model.quantization.float_gemv import decode_gemv_allowed

    layer = _gate_up()
    assert layer.float_gemv_gated is None  # no planned launch for this shape (nor on CPU)
    layer.float_gemv_gated = {"block_n": 8, "block_k": 64, "split_k": 1}
    layer.float_gemv_scale = torch.ones(48, device=DEVICE)
    gen = torch.Generator().manual_seed(4)
    one = torch.randn(1, 192, generator=gen).to(DEVICE, _dtype())
    two = torch.randn(2, 192, generator=gen).to(DEVICE, _dtype())
    assert layer.silu_mul(one) is None  # eager
    with decode_gemv_allowed():
        out = layer.silu_mul(one)
        assert layer.silu_mul(two) is None
        assert _gate_up(bias=True).silu_mul(one) is None
        assert _gate_up(sizes=(24, 16)).silu_mul(one) is None
    assert out.shape == (1, 24)
    tol = 1e-5 if _dtype() == torch.float32 else 1e-2
    assert _err(out, _silu_mul_reference(one.float().cpu(), layer.weight.float().cpu())) < tol


@in_process
def test_wna16_layer_silu_mul_is_the_mlp_activation_of_its_forward() -> None:
    """A GPTQ-layout layer in the kernels' packing: silu_mul at decode batches (the GEMV's gated launch)
    equals its forward followed by SiLU-mul, act-order permutation included; past the GEMV's batches
    it declines."""
    from engine.model.layers.linear import MergedColumnParallelLinear
    from engine.model.quantization.wna16 import apply_wna16, apply_wna16_silu_mul, register_kernel_layout

    gen = torch.Generator().manual_seed(9)
    layer = MergedColumnParallelLinear(256, [32, 32], params_dtype=_dtype())
    codes = torch.randint(0, 16, (64, 256), generator=gen).to(torch.uint8)  # [out, in]
    zeros = torch.randint(0, 16, (64, 2), generator=gen).float()
    scales = torch.rand(64, 2, generator=gen) * 0.02 + 0.001
    perm = torch.randperm(256, generator=gen)
    register_kernel_layout(layer, codes, zeros, scales, perm, 4)
    layer.to(DEVICE)
    for tokens in (1, 3):
        x = torch.randn(tokens, 256, generator=gen).to(DEVICE, _dtype())
        full = apply_wna16(layer, x, None).float()  # [tokens, 64]
        expected = F.silu(full[:, :32]) * full[:, 32:]
        out = apply_wna16_silu_mul(layer, x)
        assert out is not None and out.shape == (tokens, 32)
        assert _err(out, expected) < (1e-5 if _dtype() == torch.float32 else 1e-2)
    assert apply_wna16_silu_mul(layer, torch.zeros(8, 256, device=DEVICE, dtype=_dtype())) is None  # the GEMM


@in_process
def test_llama_mlp_takes_the_gated_projection_at_decode_and_keeps_its_output() -> None:
    """LlamaMLP at one token inside graph capture: gate_up's gated launch then down_proj, the same
    output as gate_up, the SiLU-mul kernel and down_proj (what every other batch runs)."""
    from types import SimpleNamespace

    from engine.model.build_context import BuildContext
    from engine.model.models.llama import LlamaMLP
    from engine.model.quantization.float_gemv import decode_gemv_allowed

    config = SimpleNamespace(hidden_size=192, intermediate_size=24, mlp_bias=False)
    mlp = LlamaMLP(config, BuildContext(dtype=_dtype()), "mlp").to(DEVICE)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for proj in (mlp.gate_up_proj, mlp.down_proj):
        proj.quant_method.process_weights_after_loading(proj)
    mlp.gate_up_proj.float_gemv_gated = {"block_n": 8, "block_k": 64, "split_k": 1}
    mlp.gate_up_proj.float_gemv_scale = torch.ones(48, device=DEVICE)
    calls = []
    silu_mul = mlp.gate_up_proj.silu_mul
    mlp.gate_up_proj.silu_mul = lambda x: calls.append(x.shape) or silu_mul(x)
    x = torch.randn(1, 192, generator=gen).to(DEVICE, _dtype())
    unfused = mlp(x)  # eager: silu_mul declines
    with decode_gemv_allowed():
        fused = mlp(x)
    assert calls == [torch.Size([1, 192])] * 2
    assert fused.shape == unfused.shape == (1, 192)
    assert _err(fused, unfused) < (1e-5 if _dtype() == torch.float32 else 1e-2)


@in_process
def test_a_lora_gate_up_takes_the_gated_launch_only_in_steps_without_adapters() -> None:
    """With a LoRA hook: a step with adapters declines (the LoRA GEMV and the activation kernel run,
    the LoRA term in between); a step without (a graph variant without the term) takes the method's
    gated launch, equal to the layer's output through SiLU-mul."""
    from engine.model.layers.linear import MergedColumnParallelLinear
    from engine.model.quantization.float_gemv import decode_gemv_allowed
    from tests.ops.test_lora_gemv_path import _hooked

    layer, lora = _hooked(MergedColumnParallelLinear(96, [20, 20]))
    layer.float_gemv_gated = {"block_n": 8, "block_k": 32, "split_k": 1}
    layer.float_gemv_scale = torch.ones(40, device=DEVICE)
    one = torch.randn(1, 96, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with decode_gemv_allowed():
        assert layer.silu_mul(one) is None  # adapters in the step
        lora.batch.active = False
        gated = layer.silu_mul(one)
        full = layer(one)  # the hook adds nothing now
        lora.batch.active = True
    assert gated is not None and gated.shape == (1, 20)
    assert _err(gated, _silu_mul_reference(one.float().cpu(), layer.weight.float().cpu())) < 1e-5
    assert _err(gated, torch.nn.functional.silu(full[:, :20]) * full[:, 20:]) < 1e-5
