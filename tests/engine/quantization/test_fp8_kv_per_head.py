"""Per-head FP8 KV-cache scales through the engine: k_scale / v_scale of shape [num_kv_heads] (vLLM's
per-attention-head layout; compressed-tensors' `attn_head` strategy shapes them [num_kv_heads, 1, 1])
loaded from the checkpoint, each head's cache bytes quantized with its own scale, each tensor-parallel
rank holding its heads' slice, generation as close to a float32 cache as the per-tensor fp8 bounds of
test_fp8_kv_cache.py, and any other shape refused at start naming the tensor and its shape.

Facts (vLLM docs, features/quantization/quantized_kvcache.md: per-attention-head k/v_scale =
[num_kv_heads]; compressed-tensors quantization/lifecycle/initialize.py: attn_head scales
(num_heads, 1, 1)).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.model.build_context import BuildContext
from engine.model.layers.attention_backend import TorchAttentionBackend
from engine.model.models.llama import LlamaForCausalLM
from engine.model.quantization.kv_cache import load_kv_cache_scales
from engine.model_config import ModelConfig
from tests.engine.quantization.fp8_kv_agreement import (
    DEFAULT_MODEL,
    assert_close_to_float32_cache,
    held_out_window,
    mean_drift,
    score_and_generate,
)
from tests.engine.quantization.test_fp8_kv_cache import _with_scales

PROMPT = [5, 9, 14, 200, 31, 7, 88, 3]


def _attn_layers(llm: LLM) -> list:
    return [layer.self_attn.attn for layer in llm.llm_engine.executor.runner.model.model.layers]  # type: ignore[attr-defined]


def _layer0_caches(model_dir: Path, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's K and V cache rows of PROMPT's tokens after its prefill: [tokens, kv_heads, head_dim]."""
    llm = LLM(str(model_dir), device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype, num_kv_blocks=8)
    llm.generate([PROMPT], SamplingParams(max_tokens=1), use_tqdm=False)
    runner = llm.llm_engine.executor.runner  # type: ignore[attr-defined]
    (block,) = {b for b in range(8) if runner.kv_caches[0][0][b].float().abs().sum() > 0}
    k, v = (c[block, : len(PROMPT)].clone() for c in runner.kv_caches[0])
    llm.shutdown()
    return k, v


def test_per_head_scales_quantize_each_head_with_its_own(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Layer 0's K/V (the same in both runs: nothing before it reads the cache) stored in an e4m3 cache
    with scales 0.03 / 5.0 (K) and 7.0 / 0.011 (V) per head are exactly fp8(x * (1 / scale_h)) of the
    float32 cache's values, head by head; layer 1's per-tensor scale fills both of its heads."""
    k_scale, v_scale = torch.tensor([0.03, 5.0]), torch.tensor([7.0, 0.011])
    ckpt = _with_scales(
        tiny_llama_dir,
        tmp_path / "ph",
        {
            "model.layers.0.self_attn.k_scale": k_scale,
            "model.layers.0.self_attn.v_scale": v_scale.reshape(2, 1, 1),  # compressed-tensors' attn_head
            "model.layers.1.self_attn.k_scale": torch.tensor(0.5),
        },
    )
    llm = LLM(str(ckpt), device="cpu", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=8)
    layers = _attn_layers(llm)
    assert [(a.k_scale.tolist(), a.v_scale.tolist()) for a in layers] == [
        (k_scale.tolist(), v_scale.tolist()),
        ([0.5, 0.5], [1.0, 1.0]),
    ]
    llm.shutdown()
    exact_k, exact_v = _layer0_caches(tiny_llama_dir, "auto")  # float32 cache
    got_k, got_v = _layer0_caches(ckpt, "fp8")
    for exact, got, scale in ((exact_k, got_k, k_scale), (exact_v, got_v, v_scale)):
        for h in range(2):
            expected = (exact[:, h] * (1.0 / scale[h])).clamp(-448, 448).to(torch.float8_e4m3fn)
            assert torch.equal(got[:, h].view(torch.uint8), expected.view(torch.uint8))
        # one scale for both heads would have stored other bytes: the heads' scales were both used
        for s in scale:
            same = (exact * (1.0 / s)).clamp(-448, 448).to(torch.float8_e4m3fn)
            assert not torch.equal(got.view(torch.uint8), same.view(torch.uint8))


@pytest.mark.parametrize(
    ("shape", "message_shape"), [((3,), "(3,)"), ((2, 2), "(2, 2)"), ((1, 2), "(1, 2)")], ids=str
)
def test_a_scale_neither_scalar_nor_per_head_is_refused_naming_it(
    tiny_llama_dir: Path, tmp_path: Path, shape: tuple[int, ...], message_shape: str
) -> None:
    ckpt = _with_scales(
        tiny_llama_dir, tmp_path / "h", {"model.layers.1.self_attn.v_scale": torch.ones(shape)}
    )
    with pytest.raises(ValueError) as e:
        LLM(str(ckpt), device="cpu", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=8)
    if shape == (3,):  # one dimension, the wrong number of heads
        assert str(e.value) == (
            f"model.layers.1.self_attn.v_scale in model.safetensors: a KV-cache scale of shape {message_shape}; "
            "weir reads one scale per tensor (a scalar) or one per KV head ([2]: the model has 2 KV heads)"
        )
    else:
        assert str(e.value) == (
            f"model.layers.1.self_attn.v_scale in model.safetensors: a KV-cache scale of shape {message_shape}; "
            "weir reads one scale per tensor (a scalar) or one per KV head ([num_kv_heads])"
        )


def test_a_non_positive_head_scale_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ckpt = _with_scales(
        tiny_llama_dir, tmp_path / "z", {"model.layers.0.self_attn.k_scale": torch.tensor([0.5, 0.0])}
    )
    with pytest.raises(ValueError) as e:
        LLM(str(ckpt), device="cpu", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=8)
    assert str(e.value) == (
        "model.layers.0.self_attn.k_scale in model.safetensors: a KV-cache scale must be positive; got 0.0"
    )


@pytest.fixture(scope="module")
def four_kv_heads_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    from tests.tiny_models import build_model

    # 8 query heads (of 8 dims) over 4 KV heads: tp_size 8 splits the queries and replicates the KV heads
    path = tmp_path_factory.mktemp("kvh") / "llama-4kv"
    return build_model("llama", path, tiny_tokenizer_dir, num_attention_heads=8, num_key_value_heads=4)


@pytest.mark.parametrize(
    ("tp_size", "expected"),
    [
        (1, [[1.0, 2.0, 3.0, 4.0]]),
        (2, [[1.0, 2.0], [3.0, 4.0]]),  # two heads a rank
        (4, [[1.0], [2.0], [3.0], [4.0]]),  # one head a rank
        (8, [[1.0], [1.0], [2.0], [2.0], [3.0], [3.0], [4.0], [4.0]]),  # each head replicated on 2 ranks
    ],
)
def test_each_tensor_parallel_rank_takes_its_heads_scales(
    four_kv_heads_dir: Path, tmp_path: Path, tp_size: int, expected: list[list[float]]
) -> None:
    """4 KV heads, per-head scales 1..4: each rank's buffers hold the scales of the KV heads whose K/V
    rows it holds (the same slice QKVParallelLinear takes; replicated heads when tp_size > 4)."""
    ckpt = _with_scales(
        four_kv_heads_dir,
        tmp_path / "tp",
        {
            "model.layers.0.self_attn.k_scale": torch.tensor([1.0, 2.0, 3.0, 4.0]),
            "model.layers.0.self_attn.v_scale": torch.tensor([10.0, 20.0, 30.0, 40.0]),
            "model.layers.1.self_attn.kv_scale": torch.tensor(0.5),
        },
    )
    config = ModelConfig.from_pretrained(str(ckpt), max_model_len=None, dtype="float32", device="cpu")
    backend = TorchAttentionBackend(torch.float8_e4m3fn)
    got, v_got, k_rows = [], [], []
    for rank in range(tp_size):
        model = LlamaForCausalLM(config, BuildContext(attn_backend=backend, tp_rank=rank, tp_size=tp_size))
        assert load_kv_cache_scales(model, [ckpt / "model.safetensors"]) == 2
        attn0, attn1 = (layer.self_attn.attn for layer in model.model.layers)
        got.append(attn0.k_scale.tolist())
        v_got.append(attn0.v_scale.tolist())
        assert attn1.k_scale.tolist() == attn1.v_scale.tolist() == [0.5] * attn1.num_kv_heads
        qkv = model.model.layers[0].self_attn.qkv_proj
        k_rows.append(qkv.kv_head_offset)  # the first KV head whose K rows the rank loads
    assert got == expected
    assert v_got == [[10 * s for s in rank] for rank in expected]
    assert k_rows == [int(rank[0]) - 1 for rank in expected]


def _scaled_heads_checkpoint(dst: Path, k_factor: float, v_factor: float) -> Path:
    """The default model with KV head 1's keys multiplied by k_factor and its values by v_factor, the
    same function: its query heads (2, 3) divided by k_factor, their o_proj columns by v_factor. Powers
    of two, so the bf16 weights change exactly."""
    shutil.copytree(DEFAULT_MODEL, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(str(weights))
    d = 64  # head_dim; 4 query heads, 2 KV heads: query heads 2, 3 read KV head 1
    for i in range(5):
        p = f"model.layers.{i}.self_attn."
        tensors[p + "k_proj.weight"][d : 2 * d] *= k_factor
        tensors[p + "q_proj.weight"][2 * d : 4 * d] /= k_factor
        tensors[p + "v_proj.weight"][d : 2 * d] *= v_factor
        tensors[p + "o_proj.weight"][:, 2 * d : 4 * d] /= v_factor
    save_file(tensors, str(weights))
    return dst


def test_per_head_generation_stays_close_to_the_float32_cache(tmp_path: Path) -> None:
    """The default model with KV head 1's keys 256x and values 1/64x head 0's (same function), so its
    keys overflow e4m3 at a per-tensor scale of 1.0 while head 0 fits; with per-head scales (1, 256)
    for K and (1, 1/64) for V the e4m3 cache stays within test_fp8_kv_cache.py's bounds of a float32
    cache: teacher-forced log p drift mean <= 0.06, max <= 1.0; >= 4 of 5 greedy prompts identical,
    every prompt's first 5 tokens identical, drift before divergence <= 0.3. The same checkpoint with
    one scale of 1.0 for every head does not."""
    ckpt = _scaled_heads_checkpoint(tmp_path / "scaled", 256.0, 1 / 64)
    window = held_out_window()
    per_head = {}
    for i in range(5):
        per_head[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([1.0, 256.0])
        per_head[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([1.0, 1 / 64])
    reference = score_and_generate(ckpt, "auto", window)
    assert_close_to_float32_cache(
        reference, score_and_generate(_with_scales(ckpt, tmp_path / "ph", per_head), "fp8", window)
    )
    # one scale of 1.0 for both heads: head 1's keys saturate, and log p moves far past the bound
    per_tensor, _ = score_and_generate(ckpt, "fp8", window, generate=False)
    assert mean_drift(reference[0], per_tensor) > 0.06
