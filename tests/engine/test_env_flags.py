"""ops/env_flags.py: weir's on/off tuning switches, 0 or 1, their defaults, and the refusal at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.worker.model_runner import ModelRunner
from ops.env_flags import ENV_FLAGS, check_env_flags, env_flag


@pytest.mark.parametrize("name", sorted(ENV_FLAGS))
def test_each_switch_reads_0_1_and_its_default(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    default = ENV_FLAGS[name][0]
    monkeypatch.delenv(name, raising=False)
    assert env_flag(name) is default
    monkeypatch.setenv(name, "")
    assert env_flag(name) is default
    for raw, on in (("1", True), ("0", False), (" 1 ", True)):
        monkeypatch.setenv(name, raw)
        assert env_flag(name) is on
    monkeypatch.setenv(name, "true")
    with pytest.raises(ValueError, match=rf"^{name} must be 0 or 1 \(unset: {int(default)}\); got 'true'$"):
        env_flag(name)
    with pytest.raises(ValueError, match=name):
        check_env_flags()


def test_the_defaults_are_the_measured_ones() -> None:
    """Off: the L2 prefetch (5% slower at batch 1); on: PDL (an H100's GPTQ batch-1 step 2.712 -> 2.542 ms,
    FP8's 3.500 -> 3.391, bf16's 5.598 -> 5.550), the fused decode
    attention (1.4% faster at batch 1 and 8), the widened fp8 KV read (T1 +11%), the FP8 quantizer kernel
    and its fusion, the LoRA segment kernels, the one-launch MoE alignment (a one-token Qwen3-30B-A3B
    layer 96.1 -> 48.8 us on an H100) and routing (a Qwen3-30B-A3B-shaped batch-1 step 5.58 -> 4.81 ms), the
    FP8 GEMMs' fast accumulation (Q3 1.375x -> 1.482x bf16's T2 on an H100), the 16-bit skinny GEMM at 2-16
    tokens (L1 batch 8 on an H100 6.100 -> 5.877 ms, batch 1 5.553 -> 5.547, with PDL on), the FP8 skinny GEMM at 3-16
    tokens (an H100's qkv at 8 tokens 17.0 us against _scaled_mm's 39.6), the W4A16 skinny GEMM at 3-255 tokens
    (an H100's Llama-3-8B layer at 8 tokens 85.0 us against the W4A16 GEMM's 146.4), the integer MoE GEMVs (a one-token
    W4A16 Mixtral-8x7B layer 485.0 -> 130.7 us on an H100) and FP8 MoE GEMVs (a Qwen3-30B-A3B-shaped
    batch-1 step with FP8 experts 4.568 -> 3.243 ms), and decode attention's unsplit launch with 2 stages and
    128-position tiles (T1 +3.0% on an H100)."""
    assert {name for name, (default, _) in ENV_FLAGS.items() if default} == {
        "WEIR_PDL",
        "WEIR_FUSED_DECODE_ATTENTION",
        "WEIR_DECODE_TWO_STAGES",
        "WEIR_DECODE_WIDE_TILE",
        "WEIR_FP8_KV_WIDEN",
        "WEIR_FP8_QUANT_KERNEL",
        "WEIR_FP8_FUSED_QUANT",
        "WEIR_LORA_SEGMENTS",
        "WEIR_MOE_ALIGN_KERNEL",
        "WEIR_MOE_ROUTE_KERNEL",
        "WEIR_FP8_FAST_ACCUM",
        "WEIR_SKINNY_GEMM",
        "WEIR_FP8_SKINNY_GEMM",
        "WEIR_W4_SKINNY_GEMM",
        "WEIR_MOE_INT_GEMV",
        "WEIR_MOE_FP8_GEMV",
    }


def test_an_engine_does_not_start_with_a_bad_switch(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """WEIR_PDL=yes is refused when the engine starts, on CPU too (where PDL would never be used):
    a benchmark must not measure the default under a setting it did not get."""
    monkeypatch.setenv("WEIR_PDL", "yes")
    config = EngineConfig(model=str(tiny_model_dirs["llama"]), device="cpu", dtype="float32", num_kv_blocks=8)
    with pytest.raises(ValueError, match=r"WEIR_PDL must be 0 or 1 \(unset: 1\); got 'yes'"):
        ModelRunner(config.resolve())


def test_tensor_parallel_timeouts_name_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.executor.multiproc_executor import seconds_from_env

    monkeypatch.delenv("WEIR_TP_TIMEOUT_S", raising=False)
    assert seconds_from_env("WEIR_TP_TIMEOUT_S", 300.0) == 300.0
    monkeypatch.setenv("WEIR_TP_TIMEOUT_S", "12.5")
    assert seconds_from_env("WEIR_TP_TIMEOUT_S", 300.0) == 12.5
    for bad in ("soon", "0", "-1", "nan"):
        monkeypatch.setenv("WEIR_TP_TIMEOUT_S", bad)
        with pytest.raises(
            ValueError, match=f"WEIR_TP_TIMEOUT_S must be a positive number of seconds; got '{bad}'"
        ):
            seconds_from_env("WEIR_TP_TIMEOUT_S", 300.0)


def test_the_fused_decode_attention_is_on_for_16_bit_caches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """WEIR_FUSED_DECODE_ATTENTION: on by default over a cache in the model's dtype, never over an fp8
    cache (its fused read-back has not run on a GPU), off everywhere with 0."""
    import torch

    from engine.model.layers.attention import Attention
    from engine.model.layers.attention_backend import TorchAttentionBackend

    def fused(cache_dtype: torch.dtype) -> bool:
        return Attention(4, 16, 2, 0.25, 0, TorchAttentionBackend(cache_dtype)).fused_decode

    monkeypatch.delenv("WEIR_FUSED_DECODE_ATTENTION", raising=False)
    assert fused(torch.bfloat16) and fused(torch.float32)
    assert not fused(torch.float8_e4m3fn) and not fused(torch.float8_e5m2)
    monkeypatch.setenv("WEIR_FUSED_DECODE_ATTENTION", "1")
    assert not fused(torch.float8_e4m3fn)
    monkeypatch.setenv("WEIR_FUSED_DECODE_ATTENTION", "0")
    assert not fused(torch.bfloat16)
