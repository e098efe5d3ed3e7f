"""The fused MoE Triton kernel (ops/triton/fused_moe.py) against its torch reference, under
TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter), at small shapes: a handful of tokens,
top-2 of a few experts, experts that get no token, sizes that are no multiple of the tiles, and a
batch past the small-block threshold. Outputs are poisoned (NaN) before the kernels run, so a pair
the kernels skip fails the comparison. Under the interpreter `tl.dot` on bf16 is wrong: fp32 and fp16.
The FP8-expert variant (W8A16: fp8 weight tiles dequantized in registers) likewise, per output channel
and per block (blocks that do not divide the shapes), with static input scales; its reference is the
float reference on the dequantized weights. So is the integer-expert variant (W4A16 / W8A16: codes
unpacked from int32 words along K, per-group zeros and scales).
"""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

from collections.abc import Callable

import pytest
import torch

from ops import reference
from ops.moe_quant import Fp8ExpertScales, IntExpertScales


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _poisoned(fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    """fn(*args) with every floating torch.empty filled with NaN: an output row the kernels skip fails the
    check (integer buffers, the alignment kernel's on a GPU, are left as they come)."""
    orig_empty = torch.empty

    def poisoned_empty(*a: object, **k: object) -> torch.Tensor:
        t = orig_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = poisoned_empty  # type: ignore[assignment]
    try:
        return fn(*args)
    finally:
        torch.empty = orig_empty


def _gemv_calls(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> list[int]:
    """The token counts fused_moe hands its decode GEMV `name` (of ops.triton.`module`), recorded as it runs."""
    import importlib

    fm = importlib.import_module("ops.triton.fused_moe")  # (ops.triton's fused_moe is the function)
    real = getattr(importlib.import_module(f"ops.triton.{module}"), name)
    calls: list[int] = []
    monkeypatch.setattr(fm, name, lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    return calls


def _inputs(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, 0] = -1e4  # expert 0 never chosen: an expert without a token gets no block
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return (
        x.to(DEVICE, dtype),
        w13.to(DEVICE, dtype),
        w2.to(DEVICE, dtype),
        weights.to(DEVICE),
        ids.to(DEVICE),
    )


@in_process
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "inter", "num_experts", "top_k", "dtype"),
    [
        (1, 64, 32, 4, 2, torch.float32),  # batch-1 decode: two experts of four
        (5, 48, 40, 6, 2, torch.float32),  # ragged hidden / intermediate tiles
        (7, 80, 24, 4, 3, torch.float16),  # top-3, fp16 (the rounding steps of the spec)
        (70, 64, 48, 8, 2, torch.float32),  # 64-row blocks; several blocks of one expert
        (2, 160, 136, 4, 2, torch.float32),  # decode tile (128-deep K tiles), both K ends ragged
    ],
)
def test_fused_moe_matches_the_reference(
    num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, dtype: torch.dtype
) -> None:
    from ops.triton.fused_moe import fused_moe

    x, w13, w2, weights, ids = _inputs(num_tokens, hidden, inter, num_experts, top_k, dtype)
    assert not (ids == 0).any()
    ref = reference.fused_moe(x, w13, w2, weights, ids)
    out = _poisoned(fused_moe, x, w13, w2, weights, ids)
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_reference_is_transformers_expert_loop() -> None:
    """The spec in float32: sum_k w_k * down(silu(gate x) * up x) over each token's chosen experts, as
    transformers' per-expert loop computes it (an expert whose column stays unused contributes nothing)."""
    x, w13, w2, weights, ids = (t.cpu() for t in _inputs(6, 32, 16, 4, 2, torch.float32))
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            gate, up = (w13[ids[t, k]] @ x[t]).chunk(2)
            expected[t] += weights[t, k] * (w2[ids[t, k]] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(reference.fused_moe(x, w13, w2, weights, ids), expected, rtol=1e-5, atol=1e-6)


@in_process
def test_alignment_sorts_pairs_by_expert_in_fixed_size_buffers() -> None:
    """Buffer sizes depend on the number of tokens only (CUDA graphs replay any routing); each expert's
    pairs sit in its own blocks, padded with num_pairs; unused experts get no block."""
    from ops.triton.fused_moe import moe_align_block_size

    ids = torch.tensor([[1, 3], [1, 2], [3, 1]], device=DEVICE)  # expert 0 unused
    sorted_pairs, block_expert, num_padded = moe_align_block_size(ids, num_experts=4, block_m=4)
    num_pairs = 6
    assert sorted_pairs.shape == (20,) and block_expert.shape == (5,)  # 6 + 4 * 3, rounded up to 4
    assert int(num_padded) == 12  # experts 1, 2, 3: one block each
    pad = num_pairs
    assert sorted_pairs[:12].tolist() == [0, 2, 5, pad, 3, pad, pad, pad, 1, 4, pad, pad]
    assert block_expert[:3].tolist() == [1, 2, 3]
    other = moe_align_block_size(torch.zeros_like(ids), num_experts=4, block_m=4)
    assert [t.shape for t in other] == [sorted_pairs.shape, block_expert.shape, num_padded.shape]


def _fp8_experts(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] float -> (float8_e4m3fn [E, N, K], scales): amax / 448 per output channel ([E, N, 1])
    or per (bn, bk) block ([E, ceil(N / bn), ceil(K / bk)]), the partial edge blocks included."""
    e, n, k = w.shape
    if block is None:
        scale = w.abs().amax(dim=2, keepdim=True) / 448  # [E, N, 1]
        full = scale
    else:
        bn, bk = block
        padded = torch.zeros(e, -(-n // bn) * bn, -(-k // bk) * bk)
        padded[:, :n, :k] = w
        scale = padded.unflatten(1, (-1, bn)).unflatten(3, (-1, bk)).abs().amax(dim=(2, 4)) / 448
        full = scale.repeat_interleave(bn, 1)[:, :n].repeat_interleave(bk, 2)[:, :, :k]
    return (w / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale.float()


@in_process
@pytest.mark.parametrize(
    ("num_tokens", "block", "static", "dtype"),
    [
        (3, None, False, torch.float32),  # per output channel, decode-sized
        (6, (16, 32), False, torch.float16),  # blocks; hidden 80 / intermediate 48 end in partial blocks
        (70, (16, 32), True, torch.float32),  # 64-row blocks of pairs; static input scales on both GEMMs
        (5, None, True, torch.float16),
    ],
)
def test_fp8_experts_match_the_reference_on_dequantized_weights(
    num_tokens: int,
    block: tuple[int, int] | None,
    static: bool,
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grouped GEMM's FP8 variant at every batch (the decode GEMVs: tests/ops/test_moe_fp8_gemv.py)."""
    from ops.triton.fused_moe import fused_moe

    monkeypatch.setenv("WEIR_MOE_FP8_GEMV", "0")

    x, w13, w2, weights, ids = (t.cpu() for t in _inputs(num_tokens, 80, 48, 6, 2, torch.float32))
    q13, s13 = _fp8_experts(w13, block)
    q2, s2 = _fp8_experts(w2, block)
    a13 = a2 = None
    if static:  # x reaches ~3-4 sigma; the SiLU-mul stays below 1: scales that saturate neither
        a13, a2 = torch.tensor([4.0 / 448]), torch.tensor([1.5 / 448])
    fp8 = Fp8ExpertScales(s13, s2, block, a13, a2)
    x = x.to(dtype)
    ref = reference.fused_moe(x, q13, q2, weights, ids, fp8)
    # the spec: the float reference on weights dequantized to x's dtype (and inputs through fp8)
    deq13 = reference.dequantize_fp8_experts(q13, s13, block, dtype)
    deq2 = reference.dequantize_fp8_experts(q2, s2, block, dtype)
    if not static:
        torch.testing.assert_close(ref, reference.fused_moe(x, deq13, deq2, weights, ids), rtol=0, atol=0)
    else:
        assert not torch.equal(ref, reference.fused_moe(x, deq13, deq2, weights, ids))  # the inputs moved
    dev = [t.to(DEVICE) for t in (x, q13, q2, weights, ids)]
    fp8_dev = Fp8ExpertScales(
        s13.to(DEVICE), s2.to(DEVICE), block, *(None if a is None else a.to(DEVICE) for a in (a13, a2))
    )
    out = _poisoned(fused_moe, *dev, fp8_dev)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.cpu(), ref, rtol=tol, atol=tol)


def _int_experts(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [E, N, K] float -> (int32 words [E, N, K / pf] along K, zeros [E, N, G], scales [E, N, G]):
    asymmetric min-max codes per group, fp16-exact scales."""
    from engine.model.quantization.packing import pack_cols

    e, n, k = w.shape
    maxq = (1 << bits) - 1
    g = w.unflatten(2, (-1, group))  # [E, N, G, group]
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scales = ((hi - lo) / maxq).clamp(min=1e-6).half().float()
    zeros = torch.round(-lo / scales).clamp(0, maxq)
    codes = torch.clamp(torch.round(g / scales[..., None]) + zeros[..., None], 0, maxq).flatten(2)
    return pack_cols(codes.reshape(e * n, k), bits).view(e, n, -1), zeros, scales


@in_process
@pytest.mark.parametrize(
    ("num_tokens", "bits", "group", "dtype", "hidden", "inter"),
    [
        (3, 4, 16, torch.float32, 80, 48),  # decode-sized; 5 groups of hidden 80, 3 of intermediate 48
        (70, 4, 16, torch.float16, 80, 48),  # 64-row blocks of pairs
        (5, 8, 16, torch.float32, 80, 48),  # W8A16
        (70, 4, 64, torch.float32, 128, 64),  # each 64-deep K tile in one group (ONE_GROUP: one scale row)
        (4, 4, 128, torch.float32, 128, 128),  # the decode tile's 128-deep K tiles, each in one group
    ],
)
def test_int_experts_match_the_reference_on_dequantized_weights(
    num_tokens: int,
    bits: int,
    group: int,
    dtype: torch.dtype,
    hidden: int,
    inter: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grouped GEMM's integer variant at every batch (decode batches too: the GEMVs that serve them
    by default are tests/ops/test_moe_wna16_gemv.py's)."""
    from ops.triton.fused_moe import fused_moe

    monkeypatch.setenv("WEIR_MOE_INT_GEMV", "0")

    x, w13, w2, weights, ids = (t.cpu() for t in _inputs(num_tokens, hidden, inter, 6, 2, torch.float32))
    q13, z13, s13 = _int_experts(w13, bits, group)
    q2, z2, s2 = _int_experts(w2, bits, group)
    quant = IntExpertScales(bits, s13, z13, s2, z2)
    x = x.to(dtype)
    ref = reference.fused_moe(x, q13, q2, weights, ids, quant)
    deq13 = reference.dequantize_int_experts(q13, z13, s13, bits, torch.float32)
    assert (deq13 - w13).abs().max() < (0.1 if bits == 4 else 0.01)  # the codes hold the weights
    deq = [
        reference.dequantize_int_experts(q, z, s, bits, dtype) for q, z, s in ((q13, z13, s13), (q2, z2, s2))
    ]
    torch.testing.assert_close(ref, reference.fused_moe(x, *deq, weights, ids), rtol=0, atol=0)
    dev = [t.to(DEVICE) for t in (x, q13, q2, weights, ids)]
    quant_dev = IntExpertScales(bits, *(t.to(DEVICE) for t in (s13, z13, s2, z2)))
    out = _poisoned(fused_moe, *dev, quant_dev)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.cpu(), ref, rtol=tol, atol=tol)


@in_process
@pytest.mark.parametrize("num_tokens", [3, 70])  # decode-sized blocks; 64-row blocks
def test_act_order_int_experts_gather_x_through_each_experts_permutation(
    num_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTQ act order (IntExpertScales.w13_perm): each expert's [gate; up] stored with its input columns
    in group order, so GEMM 1 reads x[:, perm[e]]: the same output as the checkpoint's order, each expert
    with its own permutation (the reference's gather and the kernel's A_PERM)."""
    from ops.triton.fused_moe import fused_moe

    monkeypatch.setenv("WEIR_MOE_INT_GEMV", "0")  # the grouped GEMM's A_PERM (the GEMVs': their own tests)
    bits, group = 4, 16
    x, w13, w2, weights, ids = (t.cpu() for t in _inputs(num_tokens, 80, 48, 6, 2, torch.float32))
    gen = torch.Generator().manual_seed(7)
    perm = torch.stack([torch.randperm(80, generator=gen) for _ in range(6)])  # [E, H]
    stored = torch.stack([w13[e][:, perm[e]] for e in range(6)])  # columns in the permuted order
    q13, z13, s13 = _int_experts(stored, bits, group)
    q2, z2, s2 = _int_experts(w2, bits, group)
    quant = IntExpertScales(bits, s13, z13, s2, z2, perm.to(torch.int32))
    ref = reference.fused_moe(x, q13, q2, weights, ids, quant)
    deq13 = reference.dequantize_int_experts(q13, z13, s13, bits, torch.float32)
    unpermuted = torch.empty_like(deq13)
    for e in range(6):
        unpermuted[e][:, perm[e]] = deq13[e]
    deq2 = reference.dequantize_int_experts(q2, z2, s2, bits, torch.float32)
    # the checkpoint's order on the same weights (sums in another order: float32 rounding apart)
    torch.testing.assert_close(
        ref, reference.fused_moe(x, unpermuted, deq2, weights, ids), rtol=1e-5, atol=1e-5
    )
    without = reference.fused_moe(x, q13, q2, weights, ids, IntExpertScales(bits, s13, z13, s2, z2))
    assert (without - ref).abs().max() > 1e-2  # the permutation matters: ignoring it is wrong
    dev = [t.to(DEVICE) for t in (x, q13, q2, weights, ids)]
    quant_dev = IntExpertScales(bits, *(t.to(DEVICE) for t in (s13, z13, s2, z2, quant.w13_perm)))
    out = _poisoned(fused_moe, *dev, quant_dev)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
