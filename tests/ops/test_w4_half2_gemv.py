"""The packed-fp16 W4A16 GEMV (ops/triton/w4_half2_gemv.py) against its spec, dequantize then F.linear:
under TRITON_INTERPRET=1 its EMULATE twin (the same bits through integer and float32 operations), on
CUDA the inline PTX. Split-K launches run twice in a row (a counter the last program failed to reset
shows up as a wrong second answer); bf16 and fp16 x (their fp16 pairs come from different code);
zero points 0 and 16 (GPTQ's v1 zeros reach 16), the edges of the exact decode."""

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


def _layer(k: int, n: int, group_size: int, seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """((qweight [K/8, N], scales [G, N] fp16, zeros [G, N] fp16) on DEVICE, the weight [N, K] float32)."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    codes = torch.randint(0, 16, (k, n), generator=gen)  # [K, N]
    zeros = torch.randint(0, 17, (groups, n), generator=gen).float()  # [G, N], 16 included
    zeros[0, :2] = torch.tensor([0.0, 16.0])
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half().float()  # [G, N]
    weight = dequantize(codes.t().to(torch.uint8), zeros.t(), scales.t(), None, torch.float32)  # [N, K]
    packed = (pack_rows(codes, 4), scales.half(), zeros.half())
    return tuple(t.to(DEVICE) for t in packed), weight.to(DEVICE)


def _err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


# (group_size, m, n, k, block_n, block_k, split_k, ahead): one tile per split up to several, an uneven
# last split, a ragged N tail, the loads one or two tiles ahead and none, groups of 32 (two-row half
# tiles), 2 and 3 rows (3 padded to a group of 4), 6 and 8 rows (two groups)
CASES = [
    (128, 1, 64, 512, 64, 128, 4, 1),
    (128, 1, 40, 384, 16, 128, 2, 2),
    (64, 1, 48, 640, 32, 64, 3, 0),
    (32, 2, 32, 256, 32, 32, 2, 1),
    (128, 3, 24, 256, 16, 64, 1, 2),
    (128, 4, 32, 1024, 32, 128, 8, 2),
    (128, 4, 48, 512, 16, 128, 2, 1),  # four rows with x ahead
    (128, 8, 32, 512, 16, 128, 2, 2),  # two groups of four rows (loadtest/peer_w4_gemv.py --batches 8)
    (128, 6, 24, 256, 16, 128, 1, 1),  # 6 rows: a second group padded with zero rows
]


@in_process
@pytest.mark.parametrize(("group_size", "m", "n", "k", "block_n", "block_k", "split_k", "ahead"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_dequantize_then_matmul(
    group_size: int,
    m: int,
    n: int,
    k: int,
    block_n: int,
    block_k: int,
    split_k: int,
    ahead: int,
    dtype: torch.dtype,
) -> None:
    from ops.triton.w4_half2_gemv import w4_half2_gemv

    args, weight = _layer(k, n, group_size, seed=k + n + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    expected = F.linear(x.float(), weight)
    for x_ahead in (False, True) if ahead == 1 else (False,):  # x's pairs (every row's) requested ahead too
        out = w4_half2_gemv(
            x,
            *args,
            group_size,
            block_n=block_n,
            block_k=block_k,
            split_k=split_k,
            ahead=ahead,
            x_ahead=x_ahead,
        )
        assert _err(out, expected) < 6e-3
    for _ in range(2):  # the second launch finds the split counters as the first left them
        out = w4_half2_gemv(
            x, *args, group_size, block_n=block_n, block_k=block_k, split_k=split_k, ahead=ahead
        )
        assert out.shape == (m, n) and out.dtype == dtype
        assert _err(out, expected) < 6e-3
    if DEVICE == "cuda":  # x 1,000 times larger: the fp16 lanes hold (|x| up to ~8,000 is the limit)
        out = w4_half2_gemv(x * 1000, *args, group_size, block_n=block_n, block_k=block_k, split_k=split_k)
        assert _err(out, expected * 1000) < 6e-3
        out = w4_half2_gemv(
            x, *args, group_size, block_n=block_n, block_k=block_k, split_k=split_k, loop_stages=3
        )
        assert _err(out, expected) < 6e-3


@in_process
@pytest.mark.parametrize("split_k", [1, 4])
def test_gated_stores_silu_gate_times_up(split_k: int) -> None:
    from ops.triton.w4_half2_gemv import w4_half2_gemv

    args, weight = _layer(256, 48, 128, seed=7)  # [gate (24 rows); up (24 rows)]
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    y = F.linear(x.float(), weight)
    expected = F.silu(y[:, :24]) * y[:, 24:]
    out = w4_half2_gemv(x, *args, 128, block_n=16, block_k=128, split_k=split_k, gated=True)
    assert out.shape == (1, 24)
    assert _err(out, expected) < 6e-3


@in_process
@pytest.mark.parametrize("gated", [False, True])
def test_an_l2_prefetch_of_other_weights_changes_no_output(gated: bool) -> None:
    """l2_next: each program asks L2 for its slice of other weights' bytes (on sm_90; nothing is asked
    elsewhere or in the interpreter): the outputs are bit for bit those without, whatever the slices
    (more programs than 16-byte chunks, an uneven last share); a prefetch not a flat 16-byte aligned
    uint8 view is refused."""
    from ops.triton.w4_half2_gemv import w4_half2_gemv

    args, _ = _layer(512, 64, 128, seed=5)
    nxt, _ = _layer(512, 96, 128, seed=6)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.bfloat16)
    launch = dict(block_n=16, block_k=128, split_k=4, gated=gated, x_ahead=True)
    plain = w4_half2_gemv(x, *args, 128, **launch)
    other = nxt[0].reshape(-1).view(torch.uint8)  # the next layer's packed words, byte by byte
    for nbytes in (other.numel(), 48, 1000):
        assert torch.equal(w4_half2_gemv(x, *args, 128, **launch, l2_next=other[:nbytes]), plain)
    two = other.view(2, -1)[:, :400]  # two ranges, each half's start ([gate; up] weights)
    assert torch.equal(w4_half2_gemv(x, *args, 128, **launch, l2_next=two), plain)
    for bad in (nxt[0], other[1:], other.view(4, -1), other.view(2, -1)[:, 1:]):
        with pytest.raises(
            ValueError,
            match="w4_half2_gemv: l2_next must be a flat uint8 view of 16-byte aligned weights, or \\[2, n\\] of two",
        ):
            w4_half2_gemv(x, *args, 128, **launch, l2_next=bad)


@in_process
def test_refuses_what_it_cannot_run() -> None:
    from ops.triton.w4_half2_gemv import w4_half2_gemv

    args, _ = _layer(64, 32, 32, seed=1)
    with pytest.raises(ValueError, match="x must be bfloat16 or float16; got torch.float32"):
        w4_half2_gemv(torch.zeros(1, 64, device=DEVICE), *args, 32, block_k=32)
    x = torch.zeros(1, 64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="takes 1 to 16 rows; got 17"):
        w4_half2_gemv(x.expand(17, 64), *args, 32, block_k=32)
    with pytest.raises(ValueError, match="block_k 64 must divide group_size 32 and be a multiple of 16"):
        w4_half2_gemv(x, *args, 32, block_k=64)
    with pytest.raises(ValueError, match="ahead is 0, 1 or 2; got 3"):
        w4_half2_gemv(x, *args, 32, block_k=32, ahead=3)
    with pytest.raises(ValueError, match="x_ahead takes ahead 1; got ahead 2"):
        w4_half2_gemv(x, *args, 32, block_k=32, ahead=2, x_ahead=True)


def test_the_engine_checks_the_zero_points_the_kernel_decodes_exactly() -> None:
    from engine.model.quantization.wna16 import FOLDED_MAX_ZERO_POINT
    from ops.triton.w4_half2_gemv import MAX_ZERO_POINT

    assert FOLDED_MAX_ZERO_POINT == MAX_ZERO_POINT


@in_process
@pytest.mark.parametrize("zero_offset", [0.0, 0.5])
def test_a_layer_takes_the_folded_gemv_only_with_integer_zero_points(zero_offset: float) -> None:
    """A 4-bit layer in the kernel layout at 1 and 2 tokens of bf16 (the folded GEMV), plain and gated,
    against the layer's torch spec; with fractional zero points it is marked and takes wna16_gemv."""
    from unittest import mock

    from engine.model.layers.linear import MergedColumnParallelLinear
    from engine.model.quantization.wna16 import (
        apply_wna16,
        apply_wna16_reference,
        apply_wna16_silu_mul,
        register_kernel_layout,
    )
    from ops.triton import w4_half2_gemv as folded

    gen = torch.Generator().manual_seed(11)
    layer = MergedColumnParallelLinear(256, [32, 32], params_dtype=torch.bfloat16)
    codes = torch.randint(0, 16, (64, 256), generator=gen).to(torch.uint8)  # [out, in]
    zeros = torch.randint(0, 17, (64, 2), generator=gen).float() + zero_offset  # [out, G]
    scales = torch.rand(64, 2, generator=gen) * 0.02 + 0.001
    register_kernel_layout(layer, codes, zeros, scales, torch.randperm(256, generator=gen), 4)
    assert layer.wna16_folded_ok == (zero_offset == 0.0)
    layer.to(DEVICE)
    for tokens in (1, 2):
        x = torch.randn(tokens, 256, generator=gen).to(DEVICE, torch.bfloat16)
        expected = apply_wna16_reference(layer, x.float(), None)  # [tokens, 64]
        with mock.patch.object(folded, "w4_half2_gemv", wraps=folded.w4_half2_gemv) as spy:
            out = apply_wna16(layer, x, None)
            gated = apply_wna16_silu_mul(layer, x)
        assert spy.call_count == (2 if zero_offset == 0.0 else 0)
        assert _err(out, expected) < 6e-3
        assert gated is not None
        assert _err(gated, F.silu(expected[:, :32]) * expected[:, 32:]) < 6e-3


@in_process
@pytest.mark.parametrize(
    ("m", "n", "k", "block_n", "split_k", "ahead", "x_ahead", "gated", "stages"),
    [
        (1, 40, 384, 16, 2, 2, False, False, 1),  # a ragged N tail: the 2-D loads masked
        (4, 48, 512, 16, 2, 1, True, False, 1),  # four rows, x ahead
        (1, 64, 512, 32, 4, 1, True, True, 1),  # gated, the one-token launch's options
        # ahead 0 with Triton's 3-stage cp.async pipeline on CUDA, gated and not (timed slower on an H100:
        # loadtest/results/w4-pipeline-stalls-h100-2026-12-07-1396ef1/)
        (1, 64, 1024, 32, 2, 0, False, True, 3),
        (1, 40, 1024, 16, 2, 0, False, False, 3),
    ],
)
def test_meta_2d_gives_the_same_outputs_bit_for_bit(
    m: int, n: int, k: int, block_n: int, split_k: int, ahead: int, x_ahead: bool, gated: bool, stages: int
) -> None:
    """meta_2d (scales and zero points loaded as [HALF_W, BLOCK_N] tiles, for their layout): the same
    arithmetic on the same values, so the same bits as the [BLOCK_N] loads, and the spec's answer; also
    with the loop's loads pipelined by Triton (stages 3: the same arithmetic, only the loads move)."""
    from ops.triton.w4_half2_gemv import w4_half2_gemv

    args, weight = _layer(k, n, 128, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(DEVICE, torch.bfloat16)
    launch = dict(block_n=block_n, block_k=128, split_k=split_k, ahead=ahead, x_ahead=x_ahead, gated=gated)
    plain = w4_half2_gemv(x, *args, 128, **launch)
    tiled = w4_half2_gemv(x, *args, 128, **launch, meta_2d=True, loop_stages=stages)
    assert torch.equal(tiled, plain)
    y = F.linear(x.float(), weight)
    expected = F.silu(y[:, : n // 2]) * y[:, n // 2 :] if gated else y
    assert _err(tiled, expected) < 6e-3


@in_process
@pytest.mark.parametrize(
    ("m", "n", "k", "block_n", "split_k", "ahead", "x_ahead", "gated"),
    [
        (1, 64, 512, 32, 4, 1, True, False),  # the one-token launch's options
        (1, 64, 512, 32, 4, 1, True, True),  # gated: each block holds its gate columns, then its up columns
        (1, 40, 384, 16, 2, 2, False, False),  # a ragged N tail: the last block padded with zero words
        (1, 44, 384, 16, 2, 1, False, True),  # gated and ragged (22 output columns in blocks of 8)
        (4, 48, 512, 16, 2, 1, True, False),  # four rows, x ahead
    ],
)
def test_col_blocked_gives_the_same_outputs_bit_for_bit(
    m: int, n: int, k: int, block_n: int, split_k: int, ahead: int, x_ahead: bool, gated: bool
) -> None:
    """col_blocked (qweight rearranged so each program's words are one contiguous run): the same words
    decoded in the same order, so the same bits as the row-major layout, and the spec's answer."""
    from ops.triton.w4_half2_gemv import col_blocked_qweight, w4_half2_gemv

    (qweight, scales, zeros), weight = _layer(k, n, 128, seed=3 * n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + 1)).to(DEVICE, torch.bfloat16)
    launch = dict(block_n=block_n, block_k=128, split_k=split_k, ahead=ahead, x_ahead=x_ahead, gated=gated)
    plain = w4_half2_gemv(x, qweight, scales, zeros, 128, **launch)
    blocked_weight = col_blocked_qweight(qweight, block_n, gated)
    tiles = -(-(n // 2) // (block_n // 2)) if gated else -(-n // block_n)
    assert blocked_weight.shape == (tiles, k // 8, block_n)
    blocked = w4_half2_gemv(x, blocked_weight, scales, zeros, 128, **launch, col_blocked=True)
    assert torch.equal(blocked, plain)
    y = F.linear(x.float(), weight)
    expected = F.silu(y[:, : n // 2]) * y[:, n // 2 :] if gated else y
    assert _err(blocked, expected) < 6e-3
    with pytest.raises(ValueError, match="column-blocked qweight"):
        w4_half2_gemv(x, qweight, scales, zeros, 128, **launch, col_blocked=True)


@in_process
def test_a_layer_reads_its_column_blocked_copy_when_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """WEIR_W4_COL_BLOCKED=1 (an experiment, off by default): a [gate | up] layer and a plain one keep a
    column-blocked copy of their words (the gated launch's order for the first) that the folded decode GEMV
    (1-4 tokens, 64-column tiles) reads, with the same outputs bit for bit as the row-major words; the
    [gate | up] layer's ungated launch and the GEMM keep the row-major words."""
    from unittest import mock

    from engine.model.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear
    from engine.model.quantization.wna16 import apply_wna16, apply_wna16_silu_mul, register_kernel_layout
    from ops.triton import w4_half2_gemv as folded

    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    outputs: dict[str, list[torch.Tensor]] = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("WEIR_W4_COL_BLOCKED", setting)
        merged = MergedColumnParallelLinear(256, [96, 96], params_dtype=torch.bfloat16)
        plain = ColumnParallelLinear(256, 160, params_dtype=torch.bfloat16)
        for layer, n in ((merged, 192), (plain, 160)):
            g = torch.Generator().manual_seed(n)
            codes = torch.randint(0, 16, (n, 256), generator=g).to(torch.uint8)  # [out, in]
            zeros = torch.randint(0, 17, (n, 2), generator=g).float()  # [out, G]
            scales = torch.rand(n, 2, generator=g) * 0.02 + 0.001
            register_kernel_layout(layer, codes, zeros, scales, None, 4)
            layer.to(DEVICE)
        assert merged.wna16_col_blocked is (True if setting == "1" else None)
        assert plain.wna16_col_blocked is (False if setting == "1" else None)
        with mock.patch.object(folded, "w4_half2_gemv", wraps=folded.w4_half2_gemv) as spy:
            outputs[setting] = [
                apply_wna16_silu_mul(merged, x),
                apply_wna16(merged, x, None),
                apply_wna16(plain, x, None),
            ]
        # the gated and the plain layer's one-token launches read the copy; the merged layer ungated does not
        blocked_calls = [call.kwargs.get("col_blocked", False) for call in spy.call_args_list]
        assert blocked_calls == ([True, False, True] if setting == "1" else [False] * 3)
    for off, on in zip(outputs["0"], outputs["1"], strict=True):
        assert torch.equal(off, on)
