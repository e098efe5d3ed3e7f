"""The tensor-core W4A16 GEMM for 5-16 tokens (ops/triton/w4_skinny_gemm.py) against its spec, dequantize then
F.linear in float32, under TRITON_INTERPRET=1 without a GPU: bf16 and fp16 x, ragged N (masked words), K split
with a short last split, groups of 32-128, zero points up to the largest the engine sends it (63). Split-K
runs are launched twice, so a counter the last program failed to reset shows up as a wrong second answer.
Under the interpreter the dot runs in float32 (the kernel's EMULATE: triton 3.9's interpreter miscasts 16-bit
dot operands); the 16-bit decode's inline PTX is compiled for sm_90 in test_kernels_compile.py and checked on
the GPU by loadtest/probe_tinygemm.py (err against the same float32 reference)."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.model.quantization.common import dequantize
from engine.model.quantization.packing import pack_rows


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _layer(group_size: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(qweight [K / 8, N] int32, scales [G, N] fp16, zeros [G, N] fp16, reference weight [N, K] float32)."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    codes = torch.randint(0, 16, (k, n), generator=gen)  # [K, N]
    zeros = torch.randint(0, 64, (groups, n), generator=gen).float()  # [G, N]: up to FOLDED_MAX_ZERO_POINT
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half().float()  # [G, N]
    weight = dequantize(codes.t().to(torch.uint8), zeros.t(), scales.t(), None, torch.float32)  # [N, K]
    return pack_rows(codes, 4), scales.half(), zeros.half(), weight


# (m, n, k, group_size, block_n, block_k, split_k, dtype)
CASES = [
    (1, 64, 128, 128, 64, 128, 1, torch.bfloat16),  # one row in a 16-row tile
    (5, 100, 256, 64, 32, 64, 2, torch.float16),  # a ragged N tail: the words loaded masked
    (8, 64, 384, 128, 64, 128, 3, torch.bfloat16),  # three splits of one tile each
    (16, 48, 512, 32, 16, 32, 4, torch.bfloat16),  # a full tile of rows; groups of 32
    (13, 64, 640, 128, 64, 64, 4, torch.float16),  # splits of 192 rows, the last one of 64
]


@in_process
@pytest.mark.parametrize(("m", "n", "k", "group_size", "block_n", "block_k", "split_k", "dtype"), CASES)
def test_w4_skinny_gemm_matches_dequantize_then_f_linear(
    m: int, n: int, k: int, group_size: int, block_n: int, block_k: int, split_k: int, dtype: torch.dtype
) -> None:
    from ops.triton.w4_skinny_gemm import w4_skinny_gemm

    qweight, scales, zeros, weight = _layer(group_size, n, k, seed=m * 100 + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    expected = F.linear(x.float(), weight)  # [M, N] float32
    # every product is exact and the sums float32: off by at most the output's own rounding (and a last bit
    # where the sums' order moves a value across a rounding boundary)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for _ in range(2):  # the second launch finds the split counters as the first left them
        out = w4_skinny_gemm(
            x.to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group_size, block_n, block_k,
            split_k,
        ).cpu()  # fmt: skip
        assert out.shape == (m, n) and out.dtype == dtype
        assert torch.allclose(out.float(), expected, rtol=ulp, atol=1e-6 * expected.abs().max().item())


@in_process
@pytest.mark.parametrize(("m", "n", "k", "group_size", "block_n", "block_k", "split_k", "dtype"), CASES[1:3])
def test_w4_skinny_gemm_with_the_scale_in_the_tile_matches_the_spec_within_16_bit_weights(
    m: int, n: int, k: int, group_size: int, block_n: int, block_k: int, split_k: int, dtype: torch.dtype
) -> None:
    """scaled=True rounds each (c - z) s to x's 16-bit type before the MMA (the W4A16 GEMM's numerics): the
    result is the spec's with 16-bit weights, rounded once more."""
    from ops.triton.w4_skinny_gemm import w4_skinny_gemm

    qweight, scales, zeros, weight = _layer(group_size, n, k, seed=m * 100 + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    expected = F.linear(
        x.float(), weight.to(dtype).float()
    )  # [M, N]: the weights rounded as the kernel rounds them
    out = w4_skinny_gemm(
        x.to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group_size, block_n, block_k, split_k,
        scaled=True,
    ).cpu()  # fmt: skip
    # (norm-wise: the interpreter rounds float32 to bf16 by truncation where torch rounds to nearest)
    err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@in_process
@pytest.mark.parametrize(
    ("m", "block_m", "split_k", "scaled"), [(40, 32, 2, True), (70, 64, 1, False), (33, 16, 3, True)]
)
def test_w4_skinny_gemm_tiles_rows_past_16(m: int, block_m: int, split_k: int, scaled: bool) -> None:
    """17-255 tokens: row tiles of block_m, the last one ragged, each with its own split-K counter (launched twice)."""
    from ops.triton.w4_skinny_gemm import w4_skinny_gemm

    qweight, scales, zeros, weight = _layer(64, 96, 384, seed=m)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).bfloat16()
    expected = F.linear(x.float(), weight.bfloat16().float() if scaled else weight)
    for _ in range(2):
        out = w4_skinny_gemm(
            x.to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), 64, block_n=32, block_k=64,
            split_k=split_k, scaled=scaled, block_m=block_m,
        ).cpu()  # fmt: skip
        assert out.shape == (m, 96)
        err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
        assert err < (1e-2 if scaled else 5e-3)


@in_process
@pytest.mark.parametrize(("group_size", "block_k", "m"), [(32, 128, 8), (64, 256, 20)])
def test_w4_skinny_gemm_scaled_tiles_may_span_groups(group_size: int, block_k: int, m: int) -> None:
    """scaled=True with a tile deeper than a group: each word row decoded with its own group's scale and zero."""
    from ops.triton.w4_skinny_gemm import w4_skinny_gemm

    qweight, scales, zeros, weight = _layer(group_size, 64, 512, seed=group_size)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).bfloat16()
    expected = F.linear(x.float(), weight.bfloat16().float())
    for _ in range(2):
        out = w4_skinny_gemm(
            x.to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group_size, block_n=32,
            block_k=block_k, split_k=2, scaled=True, block_m=16 if m <= 16 else 32,
        ).cpu()  # fmt: skip
        err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
        assert err < 1e-2


@in_process
def test_w4_skinny_gemm_refuses_what_it_cannot_run() -> None:
    from ops.triton.w4_skinny_gemm import w4_skinny_gemm

    qweight, scales, zeros, _ = _layer(64, 64, 256, seed=0)
    args = (qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), 64)
    x = torch.randn(257, 256, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="takes 1 to 256 rows of x; got 257"):
        w4_skinny_gemm(x, *args)
    with pytest.raises(ValueError, match="block_m is 16, 32, 64 or 128; got 48"):
        w4_skinny_gemm(x[:8], *args, block_k=64, block_m=48)
    with pytest.raises(ValueError, match="x must be bfloat16 or float16; got torch.float32"):
        w4_skinny_gemm(x[:8].float(), *args)
    with pytest.raises(ValueError, match="block_k 128 must divide group_size 64"):
        w4_skinny_gemm(x[:8], *args, block_k=128)
    with pytest.raises(ValueError, match="does not pack K=128"):
        w4_skinny_gemm(x[:8, :128], *args)


def _kernel_layer(n: int, k: int, group_size: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A linear in the kernels' layout (engine.model.quantization.wna16.register_kernel_layout) and its
    reference weight [N, K] float32."""
    from engine.model.quantization.wna16 import register_kernel_layout

    qweight, scales, zeros, weight = _layer(group_size, n, k, seed)
    codes = torch.stack([(qweight >> (4 * i)) & 0xF for i in range(8)], dim=1).reshape(k, n)  # [K, N]
    layer = nn.Module()
    register_kernel_layout(layer, codes.t().to(torch.uint8), zeros.t().float(), scales.t().float(), None, 4)
    return layer.to(DEVICE), weight


@in_process
@pytest.mark.parametrize("switch", ["1", "0"])
def test_decode_batches_of_3_to_16_take_the_skinny_gemm_unless_switched_off(
    switch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """apply_wna16 at 4 and 8 bf16 tokens on a 4-bit layer with integer zero points runs w4_skinny_gemm (the
    engine's 3-255-token path, WEIR_W4_SKINNY_GEMM), matching the spec within 16-bit weights; a [gate | up]
    layer's SiLU-mul then runs after it, not in the gated GEMV (apply_wna16_silu_mul declines). With the
    switch off neither happens."""
    import ops.triton.w4_skinny_gemm as skinny
    from engine.model.quantization import wna16

    calls = []
    real = skinny.w4_skinny_gemm
    monkeypatch.setattr(skinny, "w4_skinny_gemm", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setenv("WEIR_W4_SKINNY_GEMM", switch)
    wna16._plan_skinny.cache_clear()  # the plan is cached per shape, with the switch as it was read
    try:
        layer, weight = _kernel_layer(128, 512, 128, seed=3)
        assert layer.wna16_folded_ok
        x = torch.randn(8, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
        out = wna16.apply_wna16(layer, x.to(DEVICE), None).cpu()
        out4 = wna16.apply_wna16(layer, x[:4].to(DEVICE), None).cpu()
        gated4 = wna16.apply_wna16_silu_mul(layer, x[:4].to(DEVICE))
    finally:
        wna16._plan_skinny.cache_clear()
    assert calls == ([(8, 512), (4, 512)] if switch == "1" else [])
    assert (gated4 is None) == (switch == "1")
    if (
        switch == "1"
    ):  # (the W4A16 GEMM's bf16 dot is one the interpreter gets wrong: tested in float32 elsewhere)
        for got, rows in ((out, x), (out4, x[:4])):
            expected = F.linear(rows.float(), weight)
            assert got.shape == (rows.shape[0], 128)
            assert ((got.double() - expected.double()).norm() / expected.double().norm()).item() < 1e-2
