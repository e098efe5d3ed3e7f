"""The one resolution of the user's options: device defaults, frozen sub-configs, the KV-cache size
written once (and max_model_len capped to it), clear errors. No model weights: a config dict."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig, ResolvedConfig
from engine.model_config import ModelConfig

_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
}


def _resolve(device: str, **options: object) -> ResolvedConfig:
    config = EngineConfig("m", **options)  # type: ignore[arg-type]
    model = ModelConfig.from_dicts(
        "m", _LLAMA, max_model_len=config.max_model_len, dtype="bfloat16", device=device
    )
    return config.resolve_with(model)


def test_device_defaults() -> None:
    cuda, cpu = _resolve("cuda"), _resolve("cpu")
    assert (cuda.scheduler.max_num_seqs, cpu.scheduler.max_num_seqs) == (1024, 256)
    # max(8192, max_model_len) on cuda, 512 on cpu
    assert (cuda.scheduler.max_num_batched_tokens, cpu.scheduler.max_num_batched_tokens) == (8192, 512)
    assert _resolve("cuda", max_model_len=4096).scheduler.max_num_batched_tokens == 8192

    # `weir serve` (usage "server"): 2048 on cuda whatever max_model_len; an explicit value wins.
    def served(device: str, **kw: object) -> int:
        return _resolve(device, usage="server", **kw).scheduler.max_num_batched_tokens

    assert (served("cuda"), served("cuda", max_model_len=4096), served("cpu")) == (2048, 2048, 512)
    assert served("cuda", max_num_batched_tokens=8192) == 8192
    with pytest.raises(ValueError, match="usage must be one of offline, server; got 'batch'"):
        EngineConfig("m", usage="batch")
    assert cuda.device.max_cuda_graph_batch_size == cpu.device.max_cuda_graph_batch_size == 1024
    # Measured on an H200 (loadtest/results/chat-mixed-h200-*): mixed graphs on up to 512 tokens.
    assert (cuda.device.max_cuda_graph_mixed_tokens, cpu.device.max_cuda_graph_mixed_tokens) == (512, 0)
    assert _resolve("cuda", max_cuda_graph_mixed_tokens=0).device.max_cuda_graph_mixed_tokens == 0
    # never more than a step holds
    small = _resolve("cuda", max_num_batched_tokens=256)
    assert small.device.max_cuda_graph_mixed_tokens == 256
    assert cuda.device.use_cuda_graphs and not _resolve("cuda", enforce_eager=True).device.use_cuda_graphs
    assert not cpu.device.use_cuda_graphs


def test_user_values_pass_through() -> None:
    r = _resolve(
        "cpu",
        tokenizer="tok",
        max_model_len=300,
        block_size=32,
        num_kv_blocks=7,
        max_num_seqs=3,
        max_num_batched_tokens=99,
        enable_prefix_caching=False,
        async_scheduling=False,
        max_waiting_requests=5,
        max_waiting_tokens=6,
        seed=11,
        load_format="dummy",
    )
    assert r.model.max_model_len == r.scheduler.max_model_len == 300
    assert (r.load.tokenizer, r.load.load_format, r.load.seed) == ("tok", "dummy", 11)
    assert (r.cache.block_size, r.cache.num_kv_blocks_override, r.cache.num_kv_blocks) == (32, 7, None)
    assert r.cache.kv_cache_dtype == "bfloat16" and not r.cache.enable_prefix_caching  # "auto"
    assert (r.scheduler.max_num_seqs, r.scheduler.max_num_batched_tokens) == (3, 99)
    assert not r.scheduler.async_scheduling
    assert (r.scheduler.max_waiting_requests, r.scheduler.max_waiting_tokens) == (5, 6)
    assert _resolve("cpu").load.tokenizer == "m"  # the model's own tokenizer by default


def test_sub_configs_are_frozen() -> None:
    r = _resolve("cpu")
    for sub in (r, r.model, r.load, r.cache, r.scheduler, r.parallel, r.device):
        field = dataclasses.fields(sub)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(sub, field, None)


def test_kv_blocks_written_once_and_cap_max_model_len(caplog: pytest.LogCaptureFixture) -> None:
    r = _resolve("cpu", max_model_len=1000, block_size=16)
    with caplog.at_level(logging.WARNING, logger="weir.engine"):
        roomy = r.with_num_kv_blocks(100)  # 1600 tokens: no cap
    assert roomy.cache.num_kv_blocks == 100 and roomy.scheduler.max_model_len == 1000
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="weir.engine"):
        tight = r.with_num_kv_blocks(9)  # 144 tokens
    assert tight.scheduler.max_model_len == 144
    assert tight.model.max_model_len == 1000  # what the model (and the memory profile) is sized for
    assert "capping max_model_len to 144" in caplog.text
    assert r.cache.num_kv_blocks is None  # the resolved config itself is untouched
    with pytest.raises(RuntimeError, match="the KV cache size is already set"):
        tight.with_num_kv_blocks(10)


def test_clear_errors(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"max_model_len \(5000\) is larger than the model's max_position"):
        _resolve("cpu", max_model_len=5000)
    with pytest.raises(ValueError, match="block_size must be one of 8, 16, 32, 64; got 12"):
        EngineConfig("m", block_size=12)
    with pytest.raises(
        ValueError, match=r"max_cuda_graph_mixed_tokens must be 0 \(off\) or a positive integer"
    ):
        EngineConfig("m", max_cuda_graph_mixed_tokens=-1)
    with pytest.raises(
        ValueError, match=r"long_prefill_token_threshold must be 0 \(off\) or a positive integer; got -5"
    ):
        EngineConfig("m", long_prefill_token_threshold=-5)
    with pytest.raises(
        ValueError, match=r"admission_reserve_tokens must be 0 \(off\) or a positive integer; got -1"
    ):
        EngineConfig("m", admission_reserve_tokens=-1)
    with pytest.raises(ValueError, match="model directory '/nonexistent' does not exist"):
        EngineConfig("/nonexistent", device="cpu").resolve()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device is 'cuda' but torch sees no CUDA device"):
            EngineConfig(str(tiny_llama_dir), device="cuda").resolve()
    resolved = EngineConfig(str(tiny_llama_dir), device="cpu").resolve()
    assert resolved.model.device == resolved.device.device == "cpu" and resolved.model.dtype == "float32"


def test_tp_broadcast_ring_options_resolve_and_are_bounded() -> None:
    parallel = _resolve("cpu", tp_broadcast_slots=4, tp_broadcast_slot_bytes=4096).parallel
    assert (parallel.tp_broadcast_slots, parallel.tp_broadcast_slot_bytes) == (4, 4096)
    default = _resolve("cpu").parallel
    assert (default.tp_broadcast_slots, default.tp_broadcast_slot_bytes) == (16, 256 * 1024)
    with pytest.raises(ValueError, match="^tp_broadcast_slots must be a positive integer; got 0$"):
        EngineConfig("m", tp_broadcast_slots=0)
    with pytest.raises(ValueError, match="^tp_broadcast_slots must be at most 4096; got 4097$"):
        EngineConfig("m", tp_broadcast_slots=4097)
    with pytest.raises(ValueError, match="^tp_broadcast_slot_bytes must be a positive integer; got -1$"):
        EngineConfig("m", tp_broadcast_slot_bytes=-1)
    with pytest.raises(
        ValueError, match="^tp_broadcast_slot_bytes must be at most 1073741824; got 1073741825$"
    ):
        EngineConfig("m", tp_broadcast_slot_bytes=(1 << 30) + 1)


def test_fit_mixed_steps_caps_the_scheduler_at_the_largest_mixed_graph() -> None:
    def cap(device: str, **kw: object) -> int:
        return _resolve(device, **kw).scheduler.mixed_step_token_cap

    assert cap("cuda") == 512  # on by default: the default largest mixed graph
    assert cap("cuda", fit_mixed_steps_to_cuda_graphs=False) == 0
    assert cap("cuda", fit_mixed_steps_to_cuda_graphs=True) == 512  # the default largest mixed graph
    assert cap("cuda", fit_mixed_steps_to_cuda_graphs=True, max_cuda_graph_mixed_tokens=256) == 256
    assert cap("cuda", fit_mixed_steps_to_cuda_graphs=True, enforce_eager=True) == 0  # no graphs
    assert cap("cpu", fit_mixed_steps_to_cuda_graphs=True) == 0  # no mixed graphs on cpu by default


def test_fair_token_weights_reach_the_scheduler_and_are_checked() -> None:
    weights = _resolve(
        "cpu", fair_prompt_token_weight=0.5, fair_output_token_weight=3
    ).scheduler.fair_token_weights
    assert weights == (0.5, 3.0)
    assert _resolve("cpu").scheduler.fair_token_weights == (1.0, 2.0)  # VTC's defaults
    assert _resolve("cpu", fair_base_share=3).scheduler.fair_base_share == 3.0
    assert _resolve("cpu").scheduler.fair_base_share == 1.0
    with pytest.raises(ValueError, match=r"fair_base_share must be a number in \(0, 1e6\]; got 0"):
        EngineConfig("m", fair_base_share=0)
    for bad in (0, -1.0, float("nan"), 2e6):
        with pytest.raises(ValueError, match="fair_output_token_weight must be a number in"):
            EngineConfig("m", fair_output_token_weight=bad)
