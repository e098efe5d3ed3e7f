"""Tensor parallelism over gloo: two worker processes on loopback produce transformers' greedy tokens
(and the in-process tp=1 engine's), token for token, on a model with one KV head (replicated over the
ranks) and an odd vocabulary (padded), under chunked prefill, preemption and prefix caching, and with a
LoRA adapter on every projection (Qwen3's tied embeddings and q/k norms:
tests/e2e/test_tensor_parallel_ray.py). One tp=2 engine serves the first tests (process
start-up dominates their time)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.errors import LoRAAdapterError
from tests.e2e.test_parity import _prompts, hf_greedy
from tests.tiny_models import build_model, hf_causal_lm

MAX_TOKENS = 20
# 60 tokens (40 + 20) need 8 blocks of 8; 9 blocks force preemption; a 7-token budget chunks prompts.
STRESS = dict(block_size=8, num_kv_blocks=9, max_num_batched_tokens=7, admission_reserve_tokens=0)
SMALL_SLOT_BYTES = 1024


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def one_kv_head_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("tp") / "llama-1kv-511"
    return build_model("llama", path, tiny_tokenizer_dir, num_key_value_heads=1, vocab_size=511)


@pytest.fixture(scope="module")
def tp_llm(one_kv_head_dir: Path) -> Iterator[LLM]:
    # Ring slots smaller than a step with a new request in full (about 1 KB of msgpack here; a step
    # of a few running requests is about 0.3 KB): those steps take the pipe, the others the ring, in
    # one run.
    llm = LLM(
        str(one_kv_head_dir),
        device="cpu",
        dtype="float32",
        tensor_parallel_size=2,
        enable_lora=True,
        max_lora_rank=8,
        tp_broadcast_slots=4,
        tp_broadcast_slot_bytes=SMALL_SLOT_BYTES,
        **STRESS,
    )
    yield llm
    llm.shutdown()


def test_tp2_matches_transformers_and_tp1_under_chunking_and_preemption(
    tp_llm: LLM, one_kv_head_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = _prompts()
    expected, _ = hf_greedy(one_kv_head_dir, prompts)
    executor = tp_llm.llm_engine.executor
    geometry = executor._channel.geometry  # type: ignore[attr-defined]
    assert (geometry.num_slots, geometry.slot_bytes) == (4, SMALL_SLOT_BYTES)
    sent = executor.sent  # type: ignore[attr-defined]
    before = sent.copy()
    with caplog.at_level(logging.WARNING, logger="weir.engine"):
        outs = tp_llm.generate(prompts, _greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    # Both paths carried steps of this run (no control call ran during it), the ring wrapping
    # around its 4 slots many times; the first step too large for a slot says which option to raise.
    assert sent["shm"] > 4 * 4 and sent["pipe"] > before["pipe"], (before, sent)
    overflows = [r.getMessage() for r in caplog.records if "tp_broadcast_slot_bytes" in r.getMessage()]
    assert len(overflows) == 1 and f"exceeds tp_broadcast_slot_bytes ({SMALL_SLOT_BYTES})" in overflows[0]
    assert tp_llm.llm_engine.stats().num_preemptions > 0
    assert tp_llm.llm_engine.scheduler.kv_cache_usage == 0.0
    # Seeded sampling too: every rank draws the same ids from the same gathered logits.
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in tp_llm.generate(prompts[:2], sampled, use_tqdm=False)]
    with LLM(str(one_kv_head_dir), device="cpu", dtype="float32", **STRESS) as tp1:
        assert [o.outputs[0].token_ids for o in tp1.generate(prompts, _greedy(), use_tqdm=False)] == expected
        assert [o.outputs[0].token_ids for o in tp1.generate(prompts[:2], sampled, use_tqdm=False)] == got


def test_tp2_prefix_cache_hits(tp_llm: LLM, one_kv_head_dir: Path) -> None:
    rng = random.Random(1)
    prompt = [rng.randrange(3, 500) for _ in range(36)]
    (expected,), _ = hf_greedy(one_kv_head_dir, [prompt], seed=101)
    first = tp_llm.generate([prompt], _greedy(), use_tqdm=False)[0]
    second = tp_llm.generate([prompt], _greedy(), use_tqdm=False)[0]
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == expected
    assert second.num_cached_tokens >= 32


def test_tp2_lora_matches_tp1(tp_llm: LLM, one_kv_head_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = hf_causal_lm(str(one_kv_head_dir), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B too: a fresh adapter's zero B would change nothing
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(str(tmp_path / "all"))
    adapter = LoRARequest("all", 1, str(tmp_path / "all"))
    prompts = _prompts()[:3]
    loras = [None, adapter, adapter]
    got = [
        o.outputs[0].token_ids
        for o in tp_llm.generate(prompts, _greedy(), use_tqdm=False, lora_request=loras)
    ]
    with LLM(str(one_kv_head_dir), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8) as tp1:
        want = [
            o.outputs[0].token_ids
            for o in tp1.generate(prompts, _greedy(), use_tqdm=False, lora_request=loras)
        ]
    assert got == want and got[1] != got[0]
    # An adapter that cannot load is the caller's error, not the workers': the engine goes on.
    with pytest.raises(LoRAAdapterError, match="LoRA adapter 'missing'"):
        tp_llm.llm_engine.add_lora(LoRARequest("missing", 2, str(tmp_path / "missing")))
    assert tp_llm.llm_engine.executor.is_healthy


def test_tp2_beam_search_ranked_on_the_device_matches_tp1(tp_llm: LLM, one_kv_head_dir: Path) -> None:
    """Beam groups ranked on the device under tensor parallelism: each rank ranks the same (gathered)
    logits, so their pools agree; the steps and candidates cross the step codec. Same beams as TP 1."""
    from engine import BeamSearchParams

    # 6 prompt tokens, 14 out: boundaries at positions 8 and 16, within the 9-block cache (prompt 1,
    # tails 4, copies 2 a boundary, freed as beams die).
    prompts = [_prompts()[0][:6]]
    params = BeamSearchParams(2, 14, ignore_eos=True, length_penalty=0.5)
    sched = tp_llm.llm_engine.scheduler
    start, started = sched.start_device_group, []
    sched.start_device_group = lambda *args: started.append(start(*args)) or started[-1]
    preemptions = sched.num_preemptions
    try:
        got = [[s.tokens for s in o.sequences] for o in tp_llm.beam_search(prompts, params)]
    finally:
        sched.start_device_group = start
    with LLM(str(one_kv_head_dir), device="cpu", dtype="float32", beam_device_ranking=False) as tp1:
        want = [[s.tokens for s in o.sequences] for o in tp1.beam_search(prompts, params)]
    assert len(started) == 1 and all(started)
    assert sched.num_preemptions == preemptions  # it ran on the device to the end
    assert got == want
    assert tp_llm.llm_engine.scheduler.kv_cache_usage == 0.0


def test_hung_worker_stops_the_engine_then_shutdown_leaves_no_worker(tp_llm: LLM) -> None:
    executor = tp_llm.llm_engine.executor
    pids = executor.worker_pids  # type: ignore[attr-defined]
    assert len(pids) == 2 and executor.is_healthy
    executor.timeout_s = 2.0  # type: ignore[attr-defined]  (the default is minutes)
    os.kill(pids[1], signal.SIGSTOP)  # alive, but never answers: rank 0 waits in its all-reduce
    start = time.monotonic()
    out = tp_llm.generate([[5, 6, 7]], _greedy(), use_tqdm=False)[0]
    assert time.monotonic() - start < 30
    assert out.outputs[0].finish_reason == "error"
    assert not executor.is_healthy
    assert "did not answer step" in str(executor.failed)  # type: ignore[attr-defined]
    channel = executor._channel  # type: ignore[attr-defined]
    shm_files = [
        Path("/dev/shm") / n for n in (channel.name, *("sem." + s[1:] for s in channel.semaphore_names))
    ]
    assert all(p.exists() for p in shm_files)
    tp_llm.shutdown()  # kills the stopped worker too; the fixture's own shutdown is then a no-op
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert [p for p in shm_files if p.exists()] == []  # the ring's memory and semaphores unlinked


def test_tp2_fp8_cache_with_per_head_scales_matches_tp1(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    """4 KV heads over 2 ranks, an e4m3 cache with per-head scales: KV heads 0-1 (rank 0) at 1e-3,
    which saturates them, heads 2-3 (rank 1) at 1.0. tp=2 gives tp=1's tokens; tp=1 with the two
    halves swapped, which is what a rank reading the other rank's scales would do, does not."""
    import json

    from tests.engine.quantization.test_fp8_kv_cache import _with_scales

    base = build_model(
        "llama", tmp_path / "llama-4kv", tiny_tokenizer_dir, num_attention_heads=8, num_key_value_heads=4
    )
    num_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]

    def per_head(k: list[float], name: str) -> Path:
        scales = {}
        for i in range(num_layers):
            scales[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k)
            scales[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(k[::-1])
        return _with_scales(base, tmp_path / name, scales)

    ckpt = per_head([1e-3, 1e-3, 1.0, 1.0], "per-head")
    swapped = per_head([1.0, 1.0, 1e-3, 1e-3], "swapped")
    prompts = _prompts()[:3]
    common = dict(device="cpu", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=64, block_size=8)

    def greedy_ids(model_dir: Path, tp: int) -> list[list[int]]:
        with LLM(str(model_dir), tensor_parallel_size=tp, **common) as llm:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]

    tp1 = greedy_ids(ckpt, 1)
    assert greedy_ids(ckpt, 2) == tp1
    assert greedy_ids(swapped, 1) != tp1


def test_ring_larger_than_dev_shm_is_refused_at_start(one_kv_head_dir: Path) -> None:
    # 4096 slots of 1 GiB: more than any /dev/shm holds. Refused before a worker is spawned (a ring
    # past /dev/shm's free space would kill the engine with SIGBUS at the first step that reaches it).
    children_before = set(multiprocessing.active_children())
    with pytest.raises(
        ValueError,
        match=r"^the tensor-parallel broadcast ring needs \d+ bytes of shared memory \(tp_broadcast_slots "
        r"4096 x tp_broadcast_slot_bytes 1073741824\), /dev/shm has \d+ free",
    ):
        LLM(
            str(one_kv_head_dir),
            device="cpu",
            dtype="float32",
            tensor_parallel_size=2,
            tp_broadcast_slots=4096,
            tp_broadcast_slot_bytes=1 << 30,
        )
    assert set(multiprocessing.active_children()) == children_before


@pytest.mark.parametrize("family", ["qwen2_moe", "granite_moe_shared", "granite4_moe"])
def test_tp2_moe_matches_transformers(tiny_model_dirs: dict[str, Path], family: str) -> None:
    """Qwen2-MoE (sigmoid-gated shared expert) and GraniteMoeShared (ungated shared MLP, loaded from
    one fused input_linear) over 2 ranks: each expert's and the shared expert's intermediate rows split,
    the router replicated, one all-reduce per MoE block; transformers' greedy tokens under chunked
    prefill."""
    model_dir = tiny_model_dirs[family]
    prompts = _prompts()  # all of them: hf_greedy caches by directory (the parity tests' run)
    expected, _ = hf_greedy(model_dir, prompts)
    with LLM(
        str(model_dir), device="cpu", dtype="float32", tensor_parallel_size=2, max_num_batched_tokens=16
    ) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)] == expected


def test_tp2_gemma2_windows_and_softcaps_match_transformers(tiny_model_dirs: dict[str, Path]) -> None:
    """Gemma 2 over two ranks (one KV head each): sliding-window and full layers, both softcaps, the
    sqrt(hidden) embedding scale after the embedding's all-reduce, chunked prefill."""
    model_dir = tiny_model_dirs["gemma2"]
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    with LLM(
        str(model_dir),
        device="cpu",
        dtype="float32",
        tensor_parallel_size=2,
        block_size=8,
        max_num_batched_tokens=7,
    ) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)] == expected


@pytest.mark.parametrize(
    "family",
    [
        "olmo",
        "stablelm",
        "starcoder2",
        "phi",
        "gpt_neox",
        "glm4",
        "cohere2",
        "exaone4",
        "gpt2",
        "gptj",
        "opt",
        "gpt_bigcode",
    ],
)
def test_tp2_layer_norm_families_match_transformers(tiny_model_dirs: dict[str, Path], family: str) -> None:
    """OLMo 1, StableLM, StarCoder2, Phi and GPT-NeoX over two ranks (Phi: its LM head's bias split with the
    vocabulary; GPT-NeoX: each rank's q/k/v heads taken from the per-head fused rows once reordered): each rank clamps its own q/k/v heads (clip_qkv is
    elementwise, so the slices clamp as the whole would) or adds its q/k/v bias slices and rotates a
    quarter of its heads (StableLM), or runs its half of StarCoder2's plain GELU MLP (the GELU is
    elementwise; c_proj's bias added once after the partial sums), and norms the replicated residual
    stream with the replicated LayerNorms; GLM-4-0414 and Command R7B: each rank's q/k heads reordered for
    their interleaved rope (within a head, so a rank's heads stay whole); EXAONE 4.0: its per-head q/k norms
    on each rank's heads, post-norms on the replicated stream; chunked prefill."""
    model_dir = tiny_model_dirs[family]
    prompts = _prompts()
    expected, _ = hf_greedy(model_dir, prompts)
    with LLM(
        str(model_dir), device="cpu", dtype="float32", tensor_parallel_size=2, max_num_batched_tokens=16
    ) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)] == expected
