"""FP8 experts at decode batches as two GEMVs (ops/triton/moe_fp8_gemv.py) against the torch reference
(ops.reference.fused_moe on the same fp8 weights and scales), under TRITON_INTERPRET=1 without a GPU:
scales per output channel and per block (blocks that do not divide the shapes), static input scales on
both GEMMs, K split or whole, tiles past the last row. Outputs are poisoned (NaN) first, so a pair or a
row the kernels skip fails. The GEMV multiplies unrounded w * scale in float32 where the reference rounds
the dequantized weights to x's dtype first: float32 agrees to 1e-5, float16 to its rounding."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch

from ops import reference
from ops.moe_quant import Fp8ExpertScales
from tests.ops.test_fused_moe import _fp8_experts, _gemv_calls, _inputs, _poisoned


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


@in_process
@pytest.mark.parametrize(
    ("num_tokens", "block", "static", "dtype", "launch"),
    [
        (1, None, False, torch.float32, {}),  # per output channel, one token: two pairs
        (3, (16, 32), False, torch.float32, {"split_k": 2}),  # blocks ending part-way; K in two splits
        (8, (16, 32), True, torch.float32, {"block_n": 8}),  # static input scales on both GEMMs
        (2, None, True, torch.float16, {}),  # a 16-bit x: its rounding apart
        (5, None, False, torch.float16, {"block_n": 16, "split_k": 3, "num_warps": 1}),
    ],
)
def test_fp8_gemv_matches_the_reference(
    num_tokens: int, block: tuple[int, int] | None, static: bool, dtype: torch.dtype, launch: dict
) -> None:
    from ops.triton.moe_fp8_gemv import fused_moe_fp8_gemv

    x, w13, w2, weights, ids = (t.cpu() for t in _inputs(num_tokens, 80, 48, 6, 2, torch.float32))
    q13, s13 = _fp8_experts(w13, block)
    q2, s2 = _fp8_experts(w2, block)
    a13, a2 = (torch.tensor([4.0 / 448]), torch.tensor([1.5 / 448])) if static else (None, None)
    quant = Fp8ExpertScales(s13, s2, block, a13, a2)
    x = x.to(dtype)
    ref = reference.fused_moe(x, q13, q2, weights, ids, quant)
    dev = [t.to(DEVICE) for t in (x, q13, q2, weights, ids)]
    quant_dev = Fp8ExpertScales(
        s13.to(DEVICE), s2.to(DEVICE), block, *(None if a is None else a.to(DEVICE) for a in (a13, a2))
    )
    out = _poisoned(lambda *a: fused_moe_fp8_gemv(*a, **launch), *dev, quant_dev)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.cpu(), ref, rtol=tol, atol=tol)


@in_process
def test_fused_moe_takes_the_fp8_gemv_at_decode_batches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """fused_moe's FP8 experts: the GEMVs at <= 8 tokens, the grouped GEMM past that or with
    WEIR_MOE_FP8_GEMV=0; both give the reference's output."""
    from ops.triton.fused_moe import fused_moe

    calls = _gemv_calls(monkeypatch, "moe_fp8_gemv", "fused_moe_fp8_gemv")
    for num_tokens, flag, took_gemv in ((8, "1", True), (9, "1", False), (2, "0", False)):
        monkeypatch.setenv("WEIR_MOE_FP8_GEMV", flag)
        x, w13, w2, weights, ids = (t.cpu() for t in _inputs(num_tokens, 80, 48, 6, 2, torch.float32))
        q13, s13 = _fp8_experts(w13, None)
        q2, s2 = _fp8_experts(w2, None)
        quant = Fp8ExpertScales(s13, s2, None)
        ref = reference.fused_moe(x, q13, q2, weights, ids, quant)
        calls.clear()
        dev = [t.to(DEVICE) for t in (x, q13, q2, weights, ids)]
        out = _poisoned(fused_moe, *dev, Fp8ExpertScales(s13.to(DEVICE), s2.to(DEVICE), None))
        assert calls == ([num_tokens] if took_gemv else []), (num_tokens, flag)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
