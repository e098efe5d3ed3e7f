"""The fused-dequant W4A16/W8A16 Triton GEMM against its spec (dequantize, then F.linear) at small
shapes, under TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter). Ragged M, N and K
tails exercise the masks; the output is poisoned first so an unwritten element fails."""

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


@in_process
@pytest.mark.parametrize(
    ("bits", "group_size", "m", "n", "k"),
    [
        (4, 32, 1, 64, 128),
        (4, 64, 5, 48, 192),
        (4, 128, 17, 32, 128),
        (8, 32, 3, 40, 96),
        (8, 64, 16, 64, 64),
    ],
)
def test_wna16_gemm_matches_dequantize_then_matmul(
    bits: int, group_size: int, m: int, n: int, k: int
) -> None:
    from ops.triton.wna16_gemm import wna16_gemm

    gen = torch.Generator().manual_seed(bits * 100 + m)
    groups = k // group_size
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen)  # [K, N]
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen).float()  # [G, N]
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half().float()  # [G, N]
    x = torch.randn(m, k, generator=gen)
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16  # the interpreter's tl.dot: fp32
    x = x.to(DEVICE, dtype)
    expected = F.linear(
        x.float(),
        dequantize(codes.t().to(torch.uint8), zeros.t(), scales.t(), None, torch.float32).to(DEVICE),
    )
    out = wna16_gemm(
        x,
        pack_rows(codes, bits).to(DEVICE),
        scales.to(DEVICE, dtype),
        zeros.to(DEVICE, dtype),
        bits,
        group_size,
        block_n=16,
    )
    assert out.shape == (m, n) and out.dtype == dtype
    assert not torch.isnan(out).any()
    err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 5e-3)


@in_process
def test_wna16_gemm_refuses_mismatched_shapes() -> None:
    from ops.triton.wna16_gemm import wna16_gemm

    x = torch.zeros(2, 64, device=DEVICE)
    qweight = torch.zeros(8, 32, dtype=torch.int32, device=DEVICE)  # K 64 at 4 bits
    scales = torch.zeros(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"qweight \(8, 32\) does not pack K=64 at 8 bits"):
        wna16_gemm(x, qweight, scales, scales, 8, 32)
    with pytest.raises(ValueError, match=r"scales/zeros \(2, 32\) do not match K=64, N=32, group_size=64"):
        wna16_gemm(x, qweight, scales, scales, 4, 64)
