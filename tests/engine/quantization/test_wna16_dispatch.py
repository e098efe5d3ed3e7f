"""How GPTQ/AWQ layers choose between the Triton W4A16/W8A16 kernels and the torch reference, and the
kernels' launch shapes: pure functions of the device, the layer and the batch (no GPU needed; the
kernels themselves run under the Triton interpreter in tests/ops/test_wna16_gemm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.model.quantization.detect import resolve_quantization
from engine.model.quantization.wna16 import WNA16Launch, plan_w4_skinny, plan_wna16, use_wna16_kernels
from tests.engine.quantization.checkpoints import write_awq
from tests.engine.quantization.weights import load_quantized

H100_SMS = 132
# Llama-3-8B's linear layers: (in, out) of qkv (fused), o, gate_up (fused), down
LLAMA3_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def test_kernels_on_cuda_only_for_layouts_they_read() -> None:
    assert use_wna16_kernels("cuda", True, False, 4, 4096, 6144)
    assert use_wna16_kernels("cuda", True, False, 8, 4096, 6144)
    assert not use_wna16_kernels("cpu", True, False, 4, 4096, 6144)  # CPU: the torch reference
    assert not use_wna16_kernels("cuda", False, False, 4, 4096, 6144)  # no Triton
    assert not use_wna16_kernels("cuda", True, True, 4, 4096, 6144)  # uneven act-order groups
    assert not use_wna16_kernels("cuda", True, False, 4, 4100, 6144)  # K not whole words
    assert not use_wna16_kernels("cuda", True, False, 4, 4096, 6148)  # N not 16-byte rows


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4])
def test_decode_batches_take_the_gemv_with_the_swept_launches(num_tokens: int) -> None:
    """The launches the H200 sweeps picked (loadtest/results/gemv-sweep-h200-2026-12-03-*,
    gemv-half2-gated-h200-2026-12-04/sweep-835ef63, folded-gemv-h200-2026-12-04/*-sweep-*)."""
    plans = {name: plan_wna16(num_tokens, k, n, 128, H100_SMS) for name, (k, n) in LLAMA3_8B.items()}
    assert {p.path for p in plans.values()} == {"gemv"}
    launches = {name: (p.block_n, p.split_k, p.num_warps, p.folded) for name, p in plans.items()}
    if num_tokens == 1:  # the folded packed-fp16 GEMV (folded-gemv-h200-2026-12-04/5-sweep-5714741)
        assert launches == {
            "qkv": (64, 8, 2, True),
            "o": (64, 8, 2, True),
            "gate_up": (64, 4, 2, True),
            "down": (64, 16, 2, True),
        }
        assert all(p.ahead == 1 and p.x_ahead and p.prefetch for p in plans.values())
    elif num_tokens == 2:
        assert launches == {
            "qkv": (64, 8, 4, True),
            "o": (64, 8, 4, True),
            "gate_up": (64, 2, 4, True),
            "down": (64, 8, 4, True),
        }
    else:  # 4 rows
        assert {name: (p.block_n, p.split_k, p.ahead, p.folded) for name, p in plans.items()} == {
            "qkv": (64, 4, 2, True),
            "o": (64, 8, 1, True),
            "gate_up": (64, 2, 2, True),
            "down": (64, 8, 1, True),
        }
    assert all(p.block_k == 128 for p in plans.values())
    # SqueezeLLM's tables have no GEMV: the GEMM at batch 1
    assert plan_wna16(1, 4096, 4096, 4096, H100_SMS, gemv=False).path == "gemm"


@pytest.mark.parametrize("setting", ["", "0", "1"])
def test_meta_2d_is_planned_only_when_switched_on(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """WEIR_W4_META_2D (off by default) puts every folded decode launch on the tile-shaped scale loads."""
    monkeypatch.setenv("WEIR_W4_META_2D", setting)
    plans = [plan_wna16(t, k, n, 128, H100_SMS) for t in (1, 2, 4) for k, n in LLAMA3_8B.values()]
    assert {(p.folded, p.meta_2d) for p in plans} == {(True, setting == "1")}


@pytest.mark.parametrize("setting", ["", "0", "1"])
def test_fp8_gemv_pipeline_is_planned_at_one_token_only_when_switched_on(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WEIR_FP8_GEMV_PIPELINE (off by default: measured slower) adds 3 loop stages to the one-token FP8 GEMV's
    launches, and nothing at 2 tokens."""
    from engine.model.quantization.fp8 import fp8_gemv_launch

    monkeypatch.setenv("WEIR_FP8_GEMV_PIPELINE", setting)
    one = [fp8_gemv_launch(k, n, H100_SMS) for k, n in LLAMA3_8B.values()]
    two = [fp8_gemv_launch(k, n, H100_SMS, num_tokens=2) for k, n in LLAMA3_8B.values()]
    assert {g.get("loop_stages", 1) for g in one} == {3 if setting == "1" else 1}
    assert {g.get("loop_stages", 1) for g in two} == {1}


def test_fp8_gemv_launches_follow_the_sweep() -> None:
    from engine.model.quantization.fp8 import fp8_gemv_launch

    got = {name: fp8_gemv_launch(k, n, H100_SMS) for name, (k, n) in LLAMA3_8B.items()}
    assert {name: (g["block_n"], g["split_k"], g["block_k"], g["num_warps"]) for name, g in got.items()} == {
        "qkv": (4, 1, 512, 2),
        "o": (4, 1, 1024, 4),
        "gate_up": (4, 1, 512, 2),
        "down": (4, 1, 1024, 4),
    }
    # block_k = 8 x 32 x num_warps: bf16 x is used in the weight tile's own layout (ops/triton/fp8_gemv.py)
    two = [fp8_gemv_launch(k, n, H100_SMS, num_tokens=2) for k, n in LLAMA3_8B.values()]
    assert all((g["block_k"], g["num_warps"]) == (512, 2) for g in two)
    # x_ahead measured no gain on these (folded-gemv-h200-2026-12-04/7-xahead-ab-6c25784): not planned
    assert not any(g.get("x_ahead") for g in [*got.values(), *two])


@pytest.mark.parametrize("num_tokens", [5, 8, 16])
def test_small_batches_split_k_to_fill_the_gpu(num_tokens: int) -> None:
    plans = {name: plan_wna16(num_tokens, k, n, 128, H100_SMS) for name, (k, n) in LLAMA3_8B.items()}
    assert {name: p.split_k for name, p in plans.items()} == {"qkv": 4, "o": 8, "gate_up": 1, "down": 8}
    for name, p in plans.items():
        k, n = LLAMA3_8B[name]
        assert (p.path, p.block_m, p.block_n, p.block_k) == ("gemm", 16, 64, 128)
        programs = -(-n // p.block_n) * p.split_k
        assert H100_SMS <= programs <= 4 * H100_SMS, name  # every SM busy, partials bounded
        assert k // p.split_k >= 256  # each split still streams a long run of K


@pytest.mark.parametrize("num_tokens", [3, 4, 5, 8, 16])
def test_small_batches_of_4_bit_layers_take_the_skinny_gemm_at_the_swept_launches(num_tokens: int) -> None:
    """4-bit layers with small integer zero points and 16-bit x (apply_wna16 checks those) run the tensor-core
    skinny GEMM at 3-16 tokens, the scale applied to the decoded tile, at the launches the H100 sweeps picked
    (loadtest/results/w4-skinny-h100-2026-12-07-593d2fe/)."""
    plans = {name: plan_w4_skinny(num_tokens, k, n, 128, H100_SMS) for name, (k, n) in LLAMA3_8B.items()}
    assert {name: (p.path, p.block_n, p.block_k, p.split_k, p.scaled) for name, p in plans.items()} == {
        "qkv": ("skinny", 64, 128, 4, True), "o": ("skinny", 64, 128, 8, True),
        "gate_up": ("skinny", 64, 128, 4, True), "down": ("skinny", 64, 128, 8, True),
    }  # fmt: skip
    assert plan_w4_skinny(num_tokens, 4096, 4096, 32, H100_SMS).block_k == 32  # a tile inside a group


@pytest.mark.parametrize(
    ("num_tokens", "block_m", "splits"),
    [(17, 32, (4, 8, 2, 8)), (32, 32, (4, 8, 2, 8)), (64, 64, (4, 4, 2, 4)), (128, 128, (2, 4, 2, 4)),
     (255, 128, (2, 4, 2, 4))],
)  # fmt: skip
def test_medium_batches_of_4_bit_layers_take_the_skinny_gemm_in_row_tiles(
    num_tokens: int, block_m: int, splits: tuple[int, ...]
) -> None:
    """17-255 tokens: row tiles of 32, 64 and 128, the splits the H100 sweep at a9e7b3d picked per shape
    (qkv, o, gate_up, down)."""
    plans = [plan_w4_skinny(num_tokens, k, n, 128, H100_SMS) for k, n in LLAMA3_8B.values()]
    assert {(p.path, p.block_m, p.block_n, p.scaled) for p in plans} == {("skinny", block_m, 64, True)}
    assert tuple(p.split_k for p in plans) == splits


def test_the_skinny_gemm_leaves_1_to_2_and_256_plus_tokens_and_follows_its_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert plan_w4_skinny(2, 4096, 4096, 128, H100_SMS) is None  # the GEMV's batches
    assert plan_w4_skinny(256, 4096, 4096, 128, H100_SMS) is None  # dequantize, then cuBLAS
    monkeypatch.setenv("WEIR_W4_SKINNY_GEMM", "0")
    assert plan_w4_skinny(8, 4096, 4096, 128, H100_SMS) is None


def test_medium_batches_tile_m_and_large_ones_dequantize_for_cublas() -> None:
    assert plan_wna16(17, 4096, 4096, 128, H100_SMS) == WNA16Launch("gemm", 32, 64, 64, 8)
    assert plan_wna16(64, 4096, 28672, 128, H100_SMS) == WNA16Launch("gemm", 64, 64, 64, 1)
    assert plan_wna16(255, 4096, 4096, 128, H100_SMS).path == "gemm"
    assert plan_wna16(256, 4096, 4096, 128, H100_SMS) == WNA16Launch("dequant")
    assert plan_wna16(8192, 14336, 4096, 32, H100_SMS) == WNA16Launch("dequant")


@pytest.mark.parametrize(("group_size", "block_k"), [(32, 32), (64, 64), (128, 128), (4096, 128)])
def test_tiles_stay_within_a_group(group_size: int, block_k: int) -> None:
    plan = plan_wna16(1, 4096, 4096, group_size, H100_SMS)
    assert plan.block_k == block_k and group_size % plan.block_k == 0


def test_a_cpu_layer_keeps_the_reference_layout(wide_llama_dir: Path, tmp_path: Path) -> None:
    quantized, _ = write_awq(wide_llama_dir, tmp_path, 64)
    model = load_quantized(quantized, resolve_quantization(quantized, None)[2])
    layer = model.model.layers[0].mlp.down_proj
    assert layer.wna16_bits == 0 and layer.codes.shape == (128, 256)


def test_gptq_random_weights_load_for_benchmarks(wide_llama_dir: Path, tmp_path: Path) -> None:
    """load_format dummy (the GPU benchmarks' random weights) on a GPTQ config: g_idx gets contiguous
    groups, not random integers that the post-load check would refuse."""
    from engine import LLM, SamplingParams
    from tests.engine.quantization.checkpoints import write_gptq

    quantized, _ = write_gptq(wide_llama_dir, tmp_path, 4, 32, True, False, "gptq")
    llm = LLM(str(quantized), device="cpu", dtype="float32", load_format="dummy", num_kv_blocks=8)
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2
    layer = llm.llm_engine.executor.runner.model.model.layers[0].self_attn.qkv_proj  # type: ignore[attr-defined]
    assert layer.perm is None and layer.g_idx is None  # the placeholder groups are contiguous
    llm.shutdown()
