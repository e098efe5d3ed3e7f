"""The tensor-core skinny GEMM (ops/triton/skinny_gemm.py) against its spec, F.linear in float32, under
TRITON_INTERPRET=1 without a GPU: ragged N and K tails and 1-16 rows exercise the masks; split-K runs
are launched twice in a row, so a counter the last program failed to reset shows up as a wrong second
answer."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import contextlib

import pytest
import torch
import torch.nn.functional as F


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


# (m, n, k, block_n, block_k, split_k)
CASES = [
    (1, 64, 128, 64, 32, 1),  # one row in a 16-row tile
    (8, 100, 160, 32, 32, 2),  # a ragged N tail; the second split ends inside a tile
    (5, 48, 200, 16, 64, 3),  # K not a multiple of the tile
    (16, 32, 96, 32, 16, 1),  # a full tile of rows
    (13, 40, 256, 16, 32, 4),
]


@in_process
@pytest.mark.parametrize(("m", "n", "k", "block_n", "block_k", "split_k"), CASES)
def test_skinny_gemm_matches_f_linear(
    m: int, n: int, k: int, block_n: int, block_k: int, split_k: int
) -> None:
    from ops.triton.skinny_gemm import skinny_gemm

    gen = torch.Generator().manual_seed(m * 1000 + k)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    expected = F.linear(x.float(), weight.float())  # [M, N]
    for _ in range(2):  # the second launch finds the split counters as the first left them
        out = skinny_gemm(x, weight, block_n=block_n, block_k=block_k, split_k=split_k)
        assert out.shape == (m, n) and out.dtype == dtype
        err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2)


@in_process
@pytest.mark.parametrize(
    ("m", "n", "k", "block_n", "block_k", "split_k"), [(1, 64, 128, 32, 64, 1), (8, 40, 200, 16, 64, 3)]
)
def test_skinny_gemm_on_fp8_weights_matches_dequantize_then_f_linear(
    m: int, n: int, k: int, block_n: int, block_k: int, split_k: int
) -> None:
    """W8A16: an FP8 weight with per-row scales, against F.linear on the dequantized weight (float32)."""
    from ops.triton.skinny_gemm import skinny_gemm

    gen = torch.Generator().manual_seed(m + k)
    weight = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    expected = F.linear(x.float(), (weight.float() * scale[:, None]).to(DEVICE))
    for _ in range(2):
        out = skinny_gemm(
            x, weight.to(DEVICE), scale.to(DEVICE), block_n=block_n, block_k=block_k, split_k=split_k
        )
        assert out.shape == (m, n) and out.dtype == dtype
        err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2)


@in_process
def test_skinny_gemm_refuses_what_it_cannot_run() -> None:
    from ops.triton.skinny_gemm import skinny_gemm

    weight = torch.zeros(32, 64, device=DEVICE)
    with pytest.raises(ValueError, match="skinny_gemm takes 1 to 16 rows of x; got 17"):
        skinny_gemm(torch.zeros(17, 64, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"skinny_gemm: x \(2, 32\)"):
        skinny_gemm(torch.zeros(2, 32, device=DEVICE), weight)
    with pytest.raises(
        ValueError, match="a scaled weight is float8_e4m3fn with \\[N\\] scales; got torch.float32"
    ):
        skinny_gemm(torch.zeros(2, 64, device=DEVICE), weight, torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous along K"):
        skinny_gemm(torch.zeros(2, 64, device=DEVICE), torch.zeros(64, 32, device=DEVICE).t())


def test_the_skinny_plan_is_on_by_default_and_read_from_a_launches_file(tmp_path, monkeypatch) -> None:
    from engine.model.quantization import float_gemv

    monkeypatch.delenv("WEIR_SKINNY_GEMM", raising=False)
    monkeypatch.delenv("WEIR_SKINNY_GEMM_LAUNCHES", raising=False)
    float_gemv._skinny_launches.cache_clear()
    assert float_gemv.plan_skinny_gemm(4096, 6144) == float_gemv._SKINNY_LAUNCHES[(4096, 6144)]  # the default
    monkeypatch.setenv("WEIR_SKINNY_GEMM", "0")
    assert float_gemv.plan_skinny_gemm(4096, 6144) is None  # off: cuBLAS
    monkeypatch.setenv("WEIR_SKINNY_GEMM", "1")
    assert float_gemv.plan_skinny_gemm(4096, 6144) == float_gemv._SKINNY_LAUNCHES[(4096, 6144)]
    assert float_gemv.plan_skinny_gemm(4096, 128256) is None  # the LM head: no plan
    launches = tmp_path / "skinny.json"
    launches.write_text(
        '{"14336x4096": {"block_n": 128, "block_k": 128, "split_k": 8, "num_warps": 4, "num_stages": 5}}'
    )
    monkeypatch.setenv("WEIR_SKINNY_GEMM_LAUNCHES", str(launches))
    float_gemv._skinny_launches.cache_clear()
    try:  # the file replaces the table
        assert float_gemv.plan_skinny_gemm(14336, 4096) == {
            "block_n": 128, "block_k": 128, "split_k": 8, "num_warps": 4, "num_stages": 5,
        }  # fmt: skip
        assert float_gemv.plan_skinny_gemm(4096, 6144) is None
        launches.write_text(
            '{"*": {"block_n": 32, "block_k": 64, "split_k": 2, "num_warps": 4, "num_stages": 2}}'
        )
        float_gemv._skinny_launches.cache_clear()  # "*": every shape
        assert float_gemv.plan_skinny_gemm(64, 96)["split_k"] == 2
    finally:
        float_gemv._skinny_launches.cache_clear()


def test_the_sweep_keeps_a_launch_only_where_it_beats_cublas_over_every_batch() -> None:
    from loadtest.sweep_gemv import skinny_launches

    def launch(block_n: int, us: float, err: float = 1e-3) -> dict:
        return {
            "block_n": block_n,
            "block_k": 128,
            "split_k": 4,
            "num_warps": 4,
            "num_stages": 3,
            "us": us,
            "err": err,
        }

    report = {
        "device": "H100",
        "qkv": {  # 64-wide wins over both batches; 128-wide is faster but wrong
            "k": 4096, "n": 6144,
            "m4": {"bf16": {"us": 20.0}, "skinny": [launch(64, 18.0), launch(128, 10.0, err=0.5)]},
            "m8": {"bf16": {"us": 21.0}, "skinny": [launch(64, 19.0), launch(128, 10.0, err=0.5)]},
        },
        "o": {"k": 4096, "n": 4096, "m8": {"bf16": {"us": 7.0}, "skinny": [launch(64, 9.0)]}},  # cuBLAS wins
    }  # fmt: skip
    assert skinny_launches(report) == {
        "4096x6144": {"block_n": 64, "block_k": 128, "split_k": 4, "num_warps": 4, "num_stages": 3}
    }


@in_process
def test_an_unquantized_linear_takes_the_skinny_gemm_at_2_to_16_tokens_inside_graph_capture_only(
    tmp_path, monkeypatch
) -> None:
    """The routing in UnquantizedLinearMethod.apply: with a planned launch (here a '*' launch, and the
    support check forced, since a CPU float32 weight has none of its own), 2-16 tokens inside the
    CUDA-graph warm-up / capture go to the skinny GEMM, one token or 17, or outside it, to F.linear;
    the outputs match F.linear either way (bias added after)."""
    import torch.nn.functional as F

    from engine.model.layers.linear import ColumnParallelLinear
    from engine.model.quantization import float_gemv, unquantized
    from ops.triton import skinny_gemm as kernel

    launches = tmp_path / "skinny.json"
    launches.write_text(
        '{"*": {"block_n": 16, "block_k": 32, "split_k": 2, "num_warps": 4, "num_stages": 2}}'
    )
    monkeypatch.setenv("WEIR_SKINNY_GEMM", "1")
    monkeypatch.setenv("WEIR_SKINNY_GEMM_LAUNCHES", str(launches))
    monkeypatch.setattr(unquantized, "skinny_gemm_supported", lambda weight: True)
    float_gemv._skinny_launches.cache_clear()
    calls: list[int] = []
    real = kernel.skinny_gemm
    monkeypatch.setattr(
        kernel, "skinny_gemm", lambda x, w, **launch: calls.append(x.shape[0]) or real(x, w, **launch)
    )
    try:
        layer = ColumnParallelLinear(96, 40, bias=True).to(DEVICE)
        gen = torch.Generator().manual_seed(0)
        for p in layer.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen))
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.skinny_gemm == {
            "block_n": 16,
            "block_k": 32,
            "split_k": 2,
            "num_warps": 4,
            "num_stages": 2,
        }
        for tokens, in_capture, skinny in ((1, True, False), (2, True, True), (16, True, True), (17, True, False),
                                           (8, False, False)):  # fmt: skip
            calls.clear()
            x = torch.randn(tokens, 96, generator=gen).to(DEVICE)
            with float_gemv.decode_gemv_allowed() if in_capture else contextlib.nullcontext():
                out = layer.quant_method.apply(layer, x, layer.bias)
            assert calls == ([tokens] if skinny else []), (tokens, in_capture)
            expected = F.linear(x, layer.weight, layer.bias)
            assert torch.allclose(out, expected, rtol=1e-5, atol=1e-4), (tokens, in_capture)
    finally:
        float_gemv._skinny_launches.cache_clear()


def test_the_fp8_skinny_plan_is_the_sweeps_table_then_a_rule_and_off_with_its_flag(monkeypatch) -> None:
    """FP8 layers' launch at 3-16 tokens (fp8.plan_fp8_skinny): Llama-3-8B's four shapes from the H100
    sweep; other shapes 64x128 tiles, K split in 4 where N / 64 tiles are under two per SM; None with
    WEIR_FP8_SKINNY_GEMM=0. A CPU layer gets none (no tensor cores), so its inputs keep their path."""
    from engine.model.quantization import fp8

    monkeypatch.setitem(fp8._SMS, 0, 132)
    cuda0 = torch.device("cuda", 0)  # only the SM count is read for it (set above)
    monkeypatch.delenv("WEIR_FP8_SKINNY_GEMM", raising=False)
    assert fp8.plan_fp8_skinny(4096, 28672, cuda0) == {
        "block_n": 64, "block_k": 128, "split_k": 1, "num_warps": 4, "num_stages": 3,
    }  # fmt: skip
    assert fp8.plan_fp8_skinny(4096, 6144, cuda0)["block_n"] == 128
    small, wide = fp8.plan_fp8_skinny(2048, 64 * 263, cuda0), fp8.plan_fp8_skinny(2048, 64 * 264, cuda0)
    assert small == {"block_n": 64, "block_k": 128, "split_k": 4, "num_warps": 4, "num_stages": 3}
    assert wide == {**small, "split_k": 1}
    monkeypatch.setenv("WEIR_FP8_SKINNY_GEMM", "0")
    assert fp8.plan_fp8_skinny(4096, 28672, cuda0) is None
    assert not fp8.hopper_with_triton(torch.device("cpu"))


@in_process
def test_an_fp8_linear_takes_the_skinny_gemm_at_3_to_16_tokens_and_hands_no_quantized_input(
    monkeypatch,
) -> None:
    """The routing in Fp8LinearMethod.apply with a planned launch (set as process_weights_after_loading
    sets it on a Hopper GPU): 3-16 tokens go to the skinny GEMM on the FP8 weight and its scales (W8A16:
    the dequantized weight times unquantized x), 1, 2 and 17 tokens keep their path (here the
    dequantizing one: this layer has no GEMV or _scaled_mm); and a norm before such a layer does not
    quantize its output at those sizes (fp8_activation.takes_fp8_activation), since the GEMM reads 16-bit x."""
    from engine.model.quantization.fp8 import Fp8Config, Fp8LinearMethod
    from engine.model.quantization.fp8_activation import takes_fp8_activation
    from ops.triton import skinny_gemm as kernel

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=gen)
    layer = torch.nn.Module()
    layer.weight_scale = (w.abs().amax(dim=1) / 448.0).to(DEVICE)  # [out] float32
    layer.weight = (w.to(DEVICE) / layer.weight_scale[:, None]).to(torch.float8_e4m3fn)  # [out, in]
    layer.input_scale = None
    layer.fp8_scaled_mm = layer.fp8_gemv = False
    layer.fp8_skinny = {"block_n": 16, "block_k": 32, "split_k": 2, "num_warps": 4, "num_stages": 2}
    layer.lora = None
    method = Fp8LinearMethod(Fp8Config(from_checkpoint=True))
    bias = torch.randn(40, generator=gen).to(DEVICE)
    dequantized = layer.weight.float() * layer.weight_scale[:, None]  # [out, in]
    calls: list[int] = []
    real = kernel.skinny_gemm
    monkeypatch.setattr(
        kernel, "skinny_gemm", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k)
    )
    for tokens, skinny in ((1, False), (2, False), (3, True), (16, True), (17, False)):
        calls.clear()
        x = torch.randn(tokens, 96, generator=gen).to(DEVICE)
        out = method.apply(layer, x, bias)
        assert calls == ([tokens] if skinny else [])
        expected = F.linear(x.float(), dequantized, bias.float())
        err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
        assert out.shape == (tokens, 40) and err < 1e-5
    layer.fp8_quant_kernel = True  # as on a CUDA W8A8 layer with dynamic scales
    assert not takes_fp8_activation(layer, 16, torch.bfloat16)
    assert takes_fp8_activation(layer, 17, torch.bfloat16)
