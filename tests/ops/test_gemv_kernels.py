"""The decode GEMVs (W4A16/W8A16 on GPTQ's layout, FP8 weights) against their spec (dequantize, then
F.linear), under TRITON_INTERPRET=1 without a GPU. Ragged N and K tails exercise the masks; split-K
runs are launched twice in a row, so a counter the last program failed to reset shows up as a wrong
second answer."""

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


def _err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def _dtype() -> torch.dtype:
    return torch.float32 if DEVICE == "cpu" else torch.bfloat16


# (bits, group_size, m, n, k, block_n, block_k, split_k): one word row per tile up to several; a
# ragged N tail; split-K with an uneven last split; group_size -1 (one group over K); codes with the
# top bit of the word set (random codes reach 15 / 255 in the last slot of a word).
WNA16_CASES = [
    (4, 32, 1, 64, 128, 32, 32, 1),
    (4, 128, 1, 40, 384, 16, 64, 4),
    (4, 64, 3, 48, 320, 32, 64, 3),
    (8, 32, 2, 40, 96, 16, 32, 1),
    (8, 64, 4, 32, 256, 16, 32, 2),
    (4, 384, 1, 24, 384, 8, 128, 2),
    (4, 64, 6, 32, 256, 16, 64, 2),  # two row groups (4 + 2 padded to 4), split-K per group
    (8, 32, 13, 16, 64, 16, 32, 1),  # four row groups, the last one row
]


@in_process
@pytest.mark.parametrize(("bits", "group_size", "m", "n", "k", "block_n", "block_k", "split_k"), WNA16_CASES)
def test_wna16_gemv_matches_dequantize_then_matmul(
    bits: int, group_size: int, m: int, n: int, k: int, block_n: int, block_k: int, split_k: int
) -> None:
    from ops.triton.wna16_gemv import wna16_gemv

    gen = torch.Generator().manual_seed(bits * 1000 + k + m)
    groups = k // group_size
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen)  # [K, N]
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen).float()  # [G, N]
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half().float()  # [G, N]
    weight = dequantize(codes.t().to(torch.uint8), zeros.t(), scales.t(), None, torch.float32)  # [N, K]
    dtype = _dtype()
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    expected = F.linear(x.float(), weight.to(DEVICE))
    args = (
        pack_rows(codes, bits).to(DEVICE),
        scales.to(DEVICE, torch.float16),
        zeros.to(DEVICE, torch.float16),
    )
    for prefetch in (False, True):
        for _ in range(2):  # the second launch finds the split counters as the first left them
            out = wna16_gemv(
                x,
                *args,
                bits,
                group_size,
                block_n=block_n,
                block_k=block_k,
                split_k=split_k,
                prefetch=prefetch,
            )
            assert out.shape == (m, n) and out.dtype == dtype
            assert _err(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2), prefetch


@in_process
def test_wna16_gemv_refuses_what_it_cannot_run() -> None:
    from ops.triton.wna16_gemv import wna16_gemv

    qweight = torch.zeros(8, 32, dtype=torch.int32, device=DEVICE)  # K 64 at 4 bits
    scales = torch.zeros(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="wna16_gemv takes 1 to 16 rows; got 17"):
        wna16_gemv(torch.zeros(17, 64, device=DEVICE), qweight, scales, scales, 4, 32)
    with pytest.raises(ValueError, match="block_k 64 must divide group_size 32 and be a multiple of 8"):
        wna16_gemv(torch.zeros(1, 64, device=DEVICE), qweight, scales, scales, 4, 32, block_k=64)


def _fp8_layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight float8 [N, K], scale [N], its dequantized float32 [N, K])."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    return weight, scale, weight.float() * scale[:, None]


# (m, n, k, block_n, block_k, split_k)
FP8_CASES = [
    (1, 32, 256, 16, 64, 1),
    (1, 24, 200, 8, 64, 2),  # one row, the second split ending inside a tile
    (2, 40, 320, 16, 64, 3),
    (4, 24, 512, 8, 128, 2),
    (3, 17, 200, 16, 64, 1),  # padded to one group of 4
    (7, 24, 256, 16, 64, 2),  # two row groups, the second padded
    (16, 16, 128, 16, 64, 1),  # four row groups
]


@in_process
@pytest.mark.parametrize(("m", "n", "k", "block_n", "block_k", "split_k"), FP8_CASES)
def test_fp8_gemv_matches_dequantize_then_matmul(
    m: int, n: int, k: int, block_n: int, block_k: int, split_k: int
) -> None:
    from ops.triton.fp8_gemv import fp8_gemv

    weight, scale, reference = _fp8_layer(n, k, seed=m * 100 + k)
    dtype = _dtype()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    expected = F.linear(x.float(), reference.to(DEVICE))
    for prefetch in (False, True):
        for _ in range(2):
            out = fp8_gemv(
                x, weight.to(DEVICE), scale.to(DEVICE), block_n=block_n, block_k=block_k, split_k=split_k,
                prefetch=prefetch,
            )  # fmt: skip
            assert out.shape == (m, n) and out.dtype == dtype
            assert _err(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2), prefetch


@in_process
@pytest.mark.parametrize(("m", "gated", "split_k"), [(1, False, 1), (1, True, 2), (3, False, 2)])
def test_fp8_gemv_pipelined_loop_gives_the_same_bits(m: int, gated: bool, split_k: int) -> None:
    """loop_stages > 1 (Triton's cp.async pipeline of the tile loads on CUDA; the interpreter runs the loop
    as written): the same tiles in the same order, so the same bits as loop_stages 1; with prefetch refused."""
    from ops.triton.fp8_gemv import fp8_gemv

    weight, scale, reference = _fp8_layer(48, 1024, seed=m + 7)
    dtype = _dtype()
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m + 3)).to(DEVICE, dtype)
    args = (x, weight.to(DEVICE), scale.to(DEVICE))
    launch = dict(block_n=4, block_k=128, split_k=split_k, num_warps=1, gated=gated)
    plain = fp8_gemv(*args, **launch)
    for stages in (3, 4):
        assert torch.equal(fp8_gemv(*args, **launch, loop_stages=stages), plain)
    y = F.linear(x.float(), reference.to(DEVICE))
    expected = F.silu(y[:, :24]) * y[:, 24:] if gated else y
    assert _err(plain, expected) < (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(
        ValueError, match="fp8_gemv: loop_stages is 1, or more without prefetch; got 3, prefetch True"
    ):
        fp8_gemv(*args, **launch, loop_stages=3, prefetch=True)


@in_process
@pytest.mark.parametrize("gated", [False, True])
def test_fp8_gemv_l2_next_changes_no_output(gated: bool) -> None:
    """l2_next: each program asks L2 for its slice of other weights (on sm_90; nothing is asked elsewhere
    or in the interpreter): outputs bit for bit those without, for FP8 and bf16 weights, whatever the
    share; a view that is not flat, uint8 and 16-byte aligned is refused."""
    from ops.triton.fp8_gemv import fp8_gemv

    weight, scale, _ = _fp8_layer(32, 256, seed=9)
    nxt, _, _ = _fp8_layer(64, 256, seed=10)
    dtype = _dtype()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    other = nxt.to(DEVICE).reshape(-1).view(torch.uint8)
    for w in (weight, weight.float().to(dtype)):  # FP8 weights and a float layer's (the bf16 GEMV's path)
        args = (x, w.to(DEVICE), scale.to(DEVICE))
        launch = dict(block_n=8, block_k=64, split_k=2, gated=gated)
        plain = fp8_gemv(*args, **launch)
        for nbytes in (other.numel(), 16, 1000):
            assert torch.equal(fp8_gemv(*args, **launch, l2_next=other[:nbytes]), plain)
        two = other.view(2, -1)[:, :400]  # two ranges, each half's start ([gate; up] weights)
        assert torch.equal(fp8_gemv(*args, **launch, l2_next=two), plain)
    with pytest.raises(
        ValueError,
        match="fp8_gemv: l2_next must be a flat uint8 view of 16-byte aligned weights, or \\[2, n\\] of two",
    ):
        fp8_gemv(x, weight.to(DEVICE), scale.to(DEVICE), l2_next=other[3:])


@in_process
def test_fp8_gemv_with_a_static_input_scale_sees_x_as_the_fp8_gemm_does() -> None:
    """x quantized to FP8 with the static scale and dequantized, as Fp8LinearMethod's reference path.
    x / scale lies 0.3 of an FP8 step above an FP8 value, so quantizing rounds it down onto that value
    (under the interpreter the kernel rounds in software, ops.triton.fp8_quant._to_fp8: the interpreter's
    own float8 cast mis-rounds values that carry into the next power of two; the GPU converts in
    hardware)."""
    from ops.triton.fp8_gemv import fp8_gemv

    weight, scale, reference = _fp8_layer(32, 256, seed=5)
    gen = torch.Generator().manual_seed(2)
    s = torch.tensor([0.01])
    on_grid = (torch.randn(2, 256, generator=gen) * 50).to(torch.float8_e4m3fn).float()  # [2, 256]
    step = torch.exp2(torch.floor(torch.log2(on_grid.abs().clamp(min=2**-6))) - 3)  # e4m3: 3 mantissa bits
    x = ((on_grid + 0.3 * step * on_grid.sign()) * s).to(DEVICE, _dtype())
    expected = F.linear(on_grid * s, reference)  # x as the FP8 GEMM sees it
    out = fp8_gemv(x, weight.to(DEVICE), scale.to(DEVICE), s.to(DEVICE), block_n=16, block_k=64, split_k=2)
    assert _err(out.cpu(), expected) < (1e-5 if DEVICE == "cpu" else 1e-2)
    # the quantization matters: x as is gives a measurably different answer
    assert _err(F.linear(x.float().cpu(), reference), expected) > 1e-2


@in_process
def test_fp8_layer_apply_at_decode_batches_takes_the_gemv_and_matches_the_reference() -> None:
    """Fp8LinearMethod.apply on a layer that may use the GEMV: 1-2 tokens go through it (bias and the
    leading dimensions kept), 3 tokens do not, and both equal the dequantizing reference."""
    from engine.model.quantization import fp8
    from ops.triton import fp8_gemv as gemv_module

    weight, scale, reference = _fp8_layer(48, 256, seed=9)
    layer = torch.nn.Module()
    layer.weight, layer.weight_scale, layer.input_scale = weight.to(DEVICE), scale.to(DEVICE), None
    layer.fp8_gemv, layer.fp8_scaled_mm = True, False  # as on a GPU with FP8 (no _scaled_mm on CPU)
    bias = torch.randn(48).to(DEVICE, _dtype())
    calls = []
    original = gemv_module.fp8_gemv
    gemv_module.fp8_gemv = lambda *a, **kw: calls.append(a[0].shape) or original(*a, **kw)
    try:
        for shape in ((1, 256), (1, 2, 256), (3, 256)):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(DEVICE, _dtype())
            out = fp8.Fp8LinearMethod.apply(None, layer, x, bias)  # type: ignore[arg-type]
            expected = F.linear(x.float().cpu(), reference, bias.float().cpu())
            assert out.shape == (*shape[:-1], 48)
            assert _err(out.float().cpu(), expected) < (1e-5 if DEVICE == "cpu" else 1e-2)
    finally:
        gemv_module.fp8_gemv = original
    assert calls == [(1, 256), (2, 256)]  # 3 tokens: the reference path (on a GPU, _scaled_mm)


@in_process
def test_unquantized_linear_takes_the_float_gemv_only_for_one_token_inside_graph_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The float-weight GEMV serves an unquantized layer at one token while the CUDA-graph runner
    warms up and captures (`decode_gemv_allowed`), with F.linear's answer; eager steps and more
    tokens keep F.linear."""
    from torch import nn

    import engine.model.quantization.unquantized as unquantized
    from engine.model.quantization.float_gemv import decode_gemv_allowed, decode_gemv_is_allowed

    gen = torch.Generator().manual_seed(7)
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randn(24, 192, generator=gen).to(DEVICE, _dtype()), requires_grad=False)
    layer.float_gemv = {"block_n": 16, "block_k": 64, "split_k": 2, "prefetch": True}  # a planned launch
    layer.float_gemv_scale = torch.ones(24, device=DEVICE)
    bias = torch.randn(24, generator=gen).to(DEVICE, _dtype())
    calls = []
    real = unquantized.float_gemv_linear
    monkeypatch.setattr(unquantized, "float_gemv_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    method = unquantized.UnquantizedLinearMethod()
    one = torch.randn(1, 192, generator=gen).to(DEVICE, _dtype())
    two = torch.randn(2, 192, generator=gen).to(DEVICE, _dtype())
    tol = 1e-5 if _dtype() == torch.float32 else 1e-2
    assert not decode_gemv_is_allowed()
    method.apply(layer, one, bias)  # eager: F.linear
    with decode_gemv_allowed():
        out = method.apply(layer, one, bias)
        method.apply(layer, two, bias)  # two tokens: F.linear
    assert not decode_gemv_is_allowed()
    assert calls == [torch.Size([1, 192])]
    assert _err(out, F.linear(one.float(), layer.weight.float(), bias.float())) < tol
