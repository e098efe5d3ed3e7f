"""The fused-dequant W4A16/W8A16 Triton GEMM against its spec (dequantize, then F.linear) at small
shapes, under TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter). Ragged M, N and K
tails exercise the masks; the output is poisoned first so an unwritten element fails."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.model.quantization.common import dequantize
from engine.model.quantization.packing import pack_rows


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _layer(bits: int, group_size: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(codes [K, N], zeros [G, N], scales [G, N]) of a random layer."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen)  # [K, N]
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen).float()  # [G, N]
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half().float()  # [G, N]
    return codes, zeros, scales


def _reference_weight(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[N, K] float32: the spec's dequantized weight."""
    return dequantize(codes.t().to(torch.uint8), zeros.t(), scales.t(), None, torch.float32)


def _err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


# (bits, group_size, m, n, k, block_k, split_k): ragged M, N and K tails; tiles within one group
# (group_size % block_k == 0) and tiles spanning groups; split-K with an uneven last split.
CASES = [
    (4, 32, 1, 64, 128, 32, 1),
    (4, 64, 5, 48, 192, 32, 1),
    (4, 128, 17, 32, 128, 32, 1),
    (8, 32, 3, 40, 96, 32, 1),
    (8, 64, 16, 64, 64, 32, 1),
    (4, 32, 2, 48, 256, 64, 1),  # a 64-row tile over two 32-row groups
    (4, 128, 1, 40, 384, 64, 4),  # split-K: 384 rows in splits of 128 (two tiles each)
    (8, 64, 3, 32, 320, 32, 3),  # split-K: 320 rows in splits of 128, the last one of 64
    (4, 384, 4, 32, 384, 128, 2),  # group_size -1 (one group): splits of 256 and 128 rows
]
# The other unpacking (a load of each row's word) on a one-group and a group-spanning tile, split.
GATHER_CASES = [(4, 32, 2, 48, 256, 64, 2), (8, 64, 3, 32, 320, 64, 1)]


@in_process
@pytest.mark.parametrize(
    ("bits", "group_size", "m", "n", "k", "block_k", "split_k", "gather_words"),
    [(*case, False) for case in CASES] + [(*case, True) for case in GATHER_CASES],
)
def test_wna16_gemm_matches_dequantize_then_matmul(
    bits: int, group_size: int, m: int, n: int, k: int, block_k: int, split_k: int, gather_words: bool
) -> None:
    from ops.triton.wna16_gemm import wna16_gemm

    codes, zeros, scales = _layer(bits, group_size, n, k, seed=bits * 100 + m + split_k)
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16  # the interpreter's tl.dot: fp32
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    expected = F.linear(x.float(), _reference_weight(codes, zeros, scales).to(DEVICE))
    out = wna16_gemm(
        x,
        pack_rows(codes, bits).to(DEVICE),
        scales.to(DEVICE, dtype),
        zeros.to(DEVICE, dtype),
        bits,
        group_size,
        block_n=16,
        block_k=block_k,
        split_k=split_k,
        gather_words=gather_words,
    )
    assert out.shape == (m, n) and out.dtype == dtype
    assert _err(out, expected) < (1e-5 if dtype == torch.float32 else 5e-3)


@in_process
@pytest.mark.parametrize(("bits", "group_size", "k", "block_k"), [(4, 32, 160, 64), (8, 128, 256, 64)])
def test_wna16_dequantize_matches_the_reference(bits: int, group_size: int, k: int, block_k: int) -> None:
    from ops.triton.wna16_gemm import wna16_dequantize

    n = 40
    codes, zeros, scales = _layer(bits, group_size, n, k, seed=7)
    out = wna16_dequantize(
        pack_rows(codes, bits).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), bits, group_size,
        torch.float32, block_n=16, block_k=block_k,
    )  # fmt: skip
    assert out.shape == (k, n)
    assert torch.equal(out.cpu(), _reference_weight(codes, zeros, scales).t())


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


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    from tests.engine.quantization.checkpoints import build_wide_llama

    return build_wide_llama(tmp_path_factory.mktemp("wna16") / "llama", tiny_tokenizer_dir)


@in_process
@pytest.mark.parametrize(
    "fmt",
    [
        "gptq-4bit-g32-act-order",
        "gptq-8bit-g-1-sym",
        "awq-g64",
        "ct-4bit-g32-asym",
        "ct-4bit-g32-asym-act-order",
    ],
    ids=lambda f: f,
)
def test_layers_in_the_kernel_layout_match_the_reference_layout(
    fmt: str, wide_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTQ/AWQ/compressed-tensors layers loaded as on a GPU (repacked for the kernels; act order as a
    permutation of x; compressed-tensors' zero points, written by the compressed-tensors library,
    as the kernels' zero values) against the same layers in the CPU reference layout, at a decode
    batch (split-K), a small prefill and a large one (dequantize, then matmul)."""
    from engine.model.quantization import common
    from engine.model.quantization.detect import resolve_quantization
    from engine.model.quantization.wna16 import apply_wna16, apply_wna16_reference
    from tests.engine.quantization.checkpoints import write_awq, write_gptq
    from tests.engine.quantization.weights import load_quantized

    if fmt.startswith("awq"):
        quantized, _ = write_awq(wide_llama, tmp_path, 64)
    elif fmt.startswith("ct"):
        from tests.engine.quantization.ct_library import write_ct_library_checkpoint

        quantized, _ = write_ct_library_checkpoint(
            wide_llama, tmp_path, 4, 32, False, "group" if "act-order" in fmt else None
        )
    elif "act-order" in fmt:
        quantized, _ = write_gptq(wide_llama, tmp_path, 4, 32, True, False, "gptq_v2")
    else:
        quantized, _ = write_gptq(wide_llama, tmp_path, 8, -1, False, True, "gptq")
    config = resolve_quantization(quantized, None)[2]
    reference = load_quantized(quantized, config).model.layers[0]
    monkeypatch.setattr(common, "use_wna16_kernels", lambda *args: True)  # as on a GPU
    kernel = load_quantized(quantized, config).model.layers[0].to(DEVICE)  # loaded on CPU: moved as a whole
    for ref_layer, layer in ((reference.self_attn.qkv_proj, kernel.self_attn.qkv_proj), (reference.mlp.down_proj, kernel.mlp.down_proj)):  # fmt: skip
        assert layer.wna16_bits == (8 if "8bit" in fmt else 4) and not hasattr(layer, "codes")
        assert (layer.perm is not None) == ("act-order" in fmt)
        for num_tokens in (1, 5, 300):
            x = torch.randn(num_tokens, layer.input_size, generator=torch.Generator().manual_seed(num_tokens))
            expected = ref_layer.quant_method.apply(ref_layer, x, None)
            got = apply_wna16(layer, x.to(DEVICE), None).cpu()
            assert got.shape == expected.shape
            assert _err(got, expected) < 1e-5  # float32 x: wna16_gemv's float32 decode, not the folded GEMV
            in_torch = apply_wna16_reference(layer, x.to(DEVICE), None).cpu()
            assert torch.allclose(in_torch, expected, atol=1e-5, rtol=1e-5)


@in_process
@pytest.mark.parametrize(("m", "n", "k", "block_k", "split_k"), [(1, 48, 256, 64, 4), (5, 40, 128, 32, 1)])
def test_lut_gemm_matches_lookup_then_matmul(m: int, n: int, k: int, block_k: int, split_k: int) -> None:
    """SqueezeLLM's layout: codes packed like GPTQ's, a 16-value table per output column."""
    from engine.model.quantization.squeezellm import dequantize_lut
    from ops.triton.wna16_gemm import lut_dequantize, lut_gemm

    gen = torch.Generator().manual_seed(m + k)
    codes = torch.randint(0, 16, (k, n), generator=gen)  # [K, N]
    table = torch.randn(n, 16, generator=gen).half().float()  # [N, 16]
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    weight = dequantize_lut(codes.t().to(torch.uint8), table, torch.float32)  # [N, K]
    qweight = pack_rows(codes, 4).to(DEVICE)
    out = lut_gemm(x, qweight, table.to(DEVICE), 4, block_n=16, block_k=block_k, split_k=split_k)
    assert _err(out, F.linear(x, weight.to(DEVICE))) < 1e-5
    assert torch.equal(
        lut_dequantize(qweight, table.to(DEVICE), 4, torch.float32, 16, block_k).cpu(), weight.t()
    )


@in_process
def test_squeezellm_layers_in_the_kernel_layout_match_the_reference(
    wide_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.model.quantization import squeezellm
    from engine.model.quantization.detect import resolve_quantization
    from tests.engine.quantization.checkpoints import write_squeezellm
    from tests.engine.quantization.weights import load_quantized

    quantized, _ = write_squeezellm(wide_llama, tmp_path)
    config = resolve_quantization(quantized, None)[2]
    reference = load_quantized(quantized, config).model.layers[1]
    monkeypatch.setattr(squeezellm, "use_wna16_kernels", lambda *args: True)  # as on a GPU
    kernel = load_quantized(quantized, config).model.layers[1].to(DEVICE)
    for ref_layer, layer in ((reference.self_attn.qkv_proj, kernel.self_attn.qkv_proj), (reference.mlp.down_proj, kernel.mlp.down_proj)):  # fmt: skip
        assert layer.lut_kernels and not hasattr(layer, "codes") and layer.qweight.dtype == torch.int32
        for num_tokens in (1, 300):
            x = torch.randn(num_tokens, layer.input_size, generator=torch.Generator().manual_seed(num_tokens))
            got = layer.quant_method.apply(layer, x.to(DEVICE)).cpu()
            assert _err(got, ref_layer.quant_method.apply(ref_layer, x)) < 1e-5
