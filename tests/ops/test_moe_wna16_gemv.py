"""Integer experts at decode batches as two GEMVs (ops/triton/moe_wna16_gemv.py) against the torch
reference (ops.reference.fused_moe on the same codes), under TRITON_INTERPRET=1 without a GPU: 4- and
8-bit codes, groups of 16 and 32 and one group per channel, words stored as checkpoints pack them and
K-major (the engine's layout after loading), K split or whole, tiles past the last column, act order,
and experts that several pairs or no pair chose. Outputs are poisoned (NaN) first, so a pair or a column
the kernels skip fails. The GEMV multiplies unrounded weights in float32 where the reference rounds the
dequantized weights to x's dtype first: float32 agrees to 1e-5, float16 to its rounding."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch

from engine.model.quantization import wna16_moe
from ops import reference
from ops.moe_quant import IntExpertScales
from tests.ops.test_fused_moe import _gemv_calls, _inputs, _int_experts, _poisoned


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _experts(num_tokens: int, bits: int, group: int, hidden: int, inter: int, act_order: bool = False):
    """(x, words13, words2, routing weights, ids, IntExpertScales, reference output in float32)."""
    x, w13, w2, weights, ids = (t.cpu() for t in _inputs(num_tokens, hidden, inter, 6, 2, torch.float32))
    perm = None
    if act_order:  # each expert's [gate; up] stored with its input columns permuted (GPTQ desc_act, folded)
        gen = torch.Generator().manual_seed(11)
        perm = torch.stack([torch.randperm(hidden, generator=gen) for _ in range(6)]).to(torch.int32)
        w13 = torch.stack([w13[e][:, perm[e].long()] for e in range(6)])
    q13, z13, s13 = _int_experts(w13, bits, group if group > 0 else hidden)
    q2, z2, s2 = _int_experts(w2, bits, group if group > 0 else inter)
    quant = IntExpertScales(bits, s13, z13, s2, z2, perm)
    return x, q13, q2, weights, ids, quant, reference.fused_moe(x, q13, q2, weights, ids, quant)


def _on_device(quant: IntExpertScales, k_major: bool) -> IntExpertScales:
    move = (lambda t: wna16_moe.k_major(t).to(DEVICE)) if k_major else (lambda t: t.to(DEVICE))
    perm = None if quant.w13_perm is None else quant.w13_perm.to(DEVICE)
    return IntExpertScales(
        quant.bits,
        move(quant.w13_scales),
        move(quant.w13_zeros),
        move(quant.w2_scales),
        move(quant.w2_zeros),
        perm,
    )


@in_process
@pytest.mark.parametrize(
    ("num_tokens", "bits", "group", "dtype", "k_major", "split_k", "hidden", "inter"),
    [
        (1, 4, 16, torch.float32, True, None, 80, 48),  # one token: two pairs, the default split
        (3, 4, 16, torch.float32, False, 1, 80, 48),  # the checkpoint's layout, K whole
        (8, 4, 32, torch.float32, True, 2, 128, 64),  # the largest GEMV batch, K in two splits
        (5, 8, 16, torch.float32, True, 3, 80, 48),  # 8-bit codes, three splits (the last one short)
        (4, 4, -1, torch.float32, True, None, 80, 48),  # one group per channel: K tiles of 16 across 80
        (2, 4, 16, torch.float16, True, 2, 80, 48),  # a 16-bit x (the engine's dtype): its rounding apart
    ],
)
def test_int_gemv_matches_the_reference(
    num_tokens: int,
    bits: int,
    group: int,
    dtype: torch.dtype,
    k_major: bool,
    split_k: int | None,
    hidden: int,
    inter: int,
) -> None:
    from ops.triton.moe_wna16_gemv import fused_moe_wna16_gemv, gemv_applies

    x, q13, q2, weights, ids, quant, ref = _experts(num_tokens, bits, group, hidden, inter)
    x = x.to(dtype)
    ref = reference.fused_moe(x, q13, q2, weights, ids, quant)
    words = [(wna16_moe.k_major(q) if k_major else q).to(DEVICE) for q in (q13, q2)]
    dev_quant = _on_device(quant, k_major)
    assert gemv_applies(x.to(DEVICE), *words, dev_quant)
    launch = {} if split_k is None else {"split_k": split_k}
    out = _poisoned(
        lambda *a: fused_moe_wna16_gemv(*a, **launch),
        x.to(DEVICE),
        *words,
        weights.to(DEVICE),
        ids.to(DEVICE),
        dev_quant,
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.cpu(), ref, rtol=tol, atol=tol)


@in_process
@pytest.mark.parametrize("k_major", [False, True])
def test_int_gemv_act_order_gathers_x_through_each_experts_permutation(k_major: bool) -> None:
    from ops.triton.moe_wna16_gemv import fused_moe_wna16_gemv

    x, q13, q2, weights, ids, quant, ref = _experts(3, 4, 16, 80, 48, act_order=True)
    without = reference.fused_moe(x, q13, q2, weights, ids, IntExpertScales(4, *_scales(quant)))
    assert (without - ref).abs().max() > 1e-2  # the permutation matters: ignoring it is wrong
    words = [(wna16_moe.k_major(q) if k_major else q).to(DEVICE) for q in (q13, q2)]
    out = _poisoned(
        fused_moe_wna16_gemv,
        x.to(DEVICE),
        *words,
        weights.to(DEVICE),
        ids.to(DEVICE),
        _on_device(quant, k_major),
    )
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def _scales(quant: IntExpertScales) -> tuple[torch.Tensor, ...]:
    return quant.w13_scales, quant.w13_zeros, quant.w2_scales, quant.w2_zeros


@in_process
def test_fused_moe_takes_the_gemv_at_decode_batches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """fused_moe's integer experts: the GEMVs at <= 8 tokens (a K tile in a group), the grouped GEMM past
    that, or with WEIR_MOE_INT_GEMV=0; both paths give the reference's output."""
    from ops.triton.fused_moe import fused_moe

    calls = _gemv_calls(monkeypatch, "moe_wna16_gemv", "fused_moe_wna16_gemv")
    for num_tokens, flag, took_gemv in ((8, "1", True), (9, "1", False), (2, "0", False)):
        monkeypatch.setenv("WEIR_MOE_INT_GEMV", flag)
        x, q13, q2, weights, ids, quant, ref = _experts(num_tokens, 4, 16, 80, 48)
        calls.clear()
        dev = [t.to(DEVICE) for t in (x, q13, q2, weights, ids)]
        out = _poisoned(fused_moe, *dev, _on_device(quant, False))
        assert calls == ([num_tokens] if took_gemv else []), (num_tokens, flag)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


@in_process
def test_gemv_block_k_divides_k_and_the_group() -> None:
    from ops.triton.moe_wna16_gemv import gemv_block_k

    assert gemv_block_k(4096, 128, 4) == 128
    assert gemv_block_k(4096, 32, 4) == 32  # GPTQ's groups of 32
    assert gemv_block_k(14336, 14336, 4) == 128  # one group per channel
    assert gemv_block_k(80, 80, 4) == 16
    assert gemv_block_k(80, 80, 8) == 16
    assert gemv_block_k(36, 36, 4) is None  # no whole-word tile divides 36 with 8 codes a word
