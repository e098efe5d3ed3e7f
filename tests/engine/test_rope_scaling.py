"""The yarn and dynamic (Dynamic NTK) rope scalings beyond the parity tests every family gets
(tests/e2e/test_parity.py: qwen2_yarn, llama_dynamic): the cos/sin cache against transformers' rotary
embedding bit for bit over yarn's options, the max_model_len each scaling serves, and dynamic on both
sides of max_position_embeddings (transformers' output below it; above it, transformers' one-pass forward
over max_model_len tokens, and where tokens can differ from its generate())."""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from engine.config import EngineConfig
from engine.model.layers.rotary import build_cos_sin_cache
from engine.model_config import ModelConfig
from engine.worker.model_runner import ModelRunner
from tests.tiny_models import DYNAMIC_MAX_POSITIONS, hf_causal_lm

SIZES = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_hidden_layers=1,
    intermediate_size=128,
    vocab_size=512,
)
LENGTH = 256


def _ours(cfg: dict[str, Any], architecture: str, max_model_len: int | None = None) -> torch.Tensor:
    """weir's cos | sin rows for a config.json dict, [max_model_len, rotary_dim]."""
    config = ModelConfig.from_dicts(
        "/m", {**cfg, "architectures": [architecture]}, max_model_len=max_model_len
    )
    return build_cos_sin_cache(
        config.rotary_dim, config.max_model_len, config.rope_theta, config.rope_scaling
    )


def _theirs(config: Any, seq_len: int) -> torch.Tensor:
    """transformers' cos | sin rows of one forward over positions 0..seq_len-1 (both halves of its
    cos and sin are the same)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    rope_class = Qwen2RotaryEmbedding if isinstance(config, Qwen2Config) else LlamaRotaryEmbedding
    cos, sin = rope_class(config)(torch.zeros(1, dtype=torch.float32), torch.arange(seq_len)[None])
    half = cos.shape[-1] // 2
    return torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1)


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
DYNAMIC = {"type": "dynamic", "factor": 2.0}
YARN_CASES = {
    "qwen2.5-style": ({}, {}),
    # Top-level pretraining length wins over rope_scaling's (as transformers builds the model)
    "top-level-original": ({}, {"original_max_position_embeddings": 64}),
    "no-original": ({"original_max_position_embeddings": None}, {}),  # -> max_position_embeddings
    "no-truncate": ({"truncate": False}, {}),
    "betas": ({"beta_fast": 16, "beta_slow": 2.0}, {}),
    "equal-betas": ({"beta_fast": 4, "beta_slow": 4}, {}),
    "mscale": ({"mscale": 0.707, "mscale_all_dim": 0.5, "factor": 40}, {}),
    "mscale-alone-ignored": ({"mscale": 2.0}, {}),
    "attention-factor": ({"attention_factor": 0.9}, {}),
    "null-factor": ({"factor": None}, {}),  # -> 256 / 32
    "factor-below-1": ({"factor": 0.5}, {}),
    "rope-parameters": ({"rope_type": "yarn", "type": None, "rope_theta": 1e6}, {}),
}


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_cache_matches_transformers(case: str) -> None:
    changes, top_level = YARN_CASES[case]
    scaling = {k: v for k, v in {**YARN, **changes}.items() if v is not None or k == "factor"}
    key = "rope_parameters" if "rope_type" in scaling else "rope_scaling"
    cfg = {**SIZES, key: scaling, **top_level}
    ours = _ours(cfg, "Qwen2ForCausalLM", LENGTH)
    theirs = _theirs(Qwen2Config(**copy.deepcopy(cfg)), LENGTH)  # (transformers edits the dict it gets)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, _ours(SIZES, "Qwen2ForCausalLM", LENGTH))  # (the scaling matters)


def test_phi3_yarn_is_longrope_as_transformers_reads_it() -> None:
    """Phi-3's configs once named longrope "yarn": transformers' Phi3Config reads it as longrope (short and
    long factors required) and refuses the other scalings, and so does weir."""
    cfg = {**SIZES, "architectures": ["Phi3ForCausalLM"]}
    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    config = ModelConfig.from_dicts("/m", {**cfg, "rope_scaling": {**YARN, **factors}})
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "longrope"
    with pytest.raises(ValueError, match="rope scaling 'longrope' in /m is missing 'short_factor'"):
        ModelConfig.from_dicts("/m", {**cfg, "rope_scaling": dict(YARN)})
    with pytest.raises(
        ValueError, match="unsupported rope_type 'dynamic' in /m; Phi-3 takes default or longrope"
    ):
        ModelConfig.from_dicts("/m", {**cfg, "rope_scaling": DYNAMIC})


def test_yarn_serves_original_times_factor_as_vllm() -> None:
    """max_model_len defaults to original_max_position_embeddings * factor where that is longer than
    max_position_embeddings (Qwen2.5's 32768 * 4 = 131072 at toy size), and a longer one is refused."""
    cfg = {**SIZES, "architectures": ["Qwen2ForCausalLM"]}
    long = {**cfg, "rope_scaling": {**YARN, "original_max_position_embeddings": 256}}
    assert ModelConfig.from_dicts("/m", long).max_model_len == 1024
    assert ModelConfig.from_dicts("/m", long, max_model_len=1000).max_model_len == 1000
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dicts("/m", long, max_model_len=1025)
    assert str(err.value) == (
        "max_model_len (1025) is larger than the model's scaled length 1024 "
        "(original_max_position_embeddings 256 * yarn factor 4.0) in /m"
    )
    # original * factor below max_position_embeddings: the model's own length stays the limit
    assert ModelConfig.from_dicts("/m", {**cfg, "rope_scaling": YARN}).max_model_len == 256
    with pytest.raises(ValueError, match=r"larger than the model's max_position_embeddings \(256\)"):
        ModelConfig.from_dicts("/m", {**cfg, "rope_scaling": YARN}, max_model_len=257)


# ---------------------------------------------------------------------------------- dynamic


@pytest.mark.parametrize("seq_len", [1, 100, 256])
def test_dynamic_cache_below_max_positions_is_transformers_at_every_length(seq_len: int) -> None:
    """The default max_model_len (max_position_embeddings): transformers' plain base for any sequence
    that fits, bit for bit (its init computes it through the NTK formula at seq_len =
    max_position_embeddings, and so does weir)."""
    cfg = {**SIZES, "rope_scaling": DYNAMIC, "rope_theta": 12345.6}
    ours = _ours(cfg, "LlamaForCausalLM")
    assert ours.shape == (256, 16)
    assert torch.equal(ours[:seq_len], _theirs(LlamaConfig(**copy.deepcopy(cfg)), seq_len))


@pytest.mark.parametrize("max_model_len", [300, 512])
def test_dynamic_cache_above_max_positions_is_transformers_at_max_model_len(max_model_len: int) -> None:
    """Past max_position_embeddings (up to * factor, vLLM's limit): the base transformers computes for
    a sequence of max_model_len tokens, at every position (at 512 = 256 * 2, vLLM's fixed base)."""
    cfg = {**SIZES, "rope_scaling": DYNAMIC}
    ours = _ours(cfg, "LlamaForCausalLM", max_model_len)
    theirs = _theirs(LlamaConfig(**copy.deepcopy(cfg)), max_model_len)
    # (transformers computes this base from a tensor seq_len, in float32: within its rounding)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert not torch.allclose(ours[:256], _ours(cfg, "LlamaForCausalLM")[:256])
    with pytest.raises(
        ValueError, match=r"scaled length 512 \(max_position_embeddings 256 \* dynamic factor"
    ):
        _ours(cfg, "LlamaForCausalLM", 513)


def _runner(model_dir: Path, max_model_len: int) -> ModelRunner:
    config = EngineConfig(
        model=str(model_dir), device="cpu", block_size=16, num_kv_blocks=16, max_model_len=max_model_len
    )
    runner = ModelRunner(config.resolve())
    runner.load_model()
    runner.initialize_kv_cache(runner.determine_num_kv_blocks())
    return runner


def _logits(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    import numpy as np

    n = len(token_ids)
    step = runner._build_inputs([token_ids], [0], [n], [list(range((n + 15) // 16))], np.arange(n))
    with torch.inference_mode():
        hidden = runner._forward(step.input_ids, step.positions, step.metadata)
        return runner.compute_logits(hidden[step.logits_indices])


def test_dynamic_past_max_positions_where_tokens_differ(
    tiny_model_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """max_model_len 2 * max_position_embeddings: a prompt of max_model_len tokens gets transformers'
    one-pass logits (the same base at every position); a short prompt does not (transformers keeps the
    plain base below max_position_embeddings): the documented limit."""
    model_dir = tiny_model_dirs["llama_dynamic"]
    long_len = 2 * DYNAMIC_MAX_POSITIONS
    rng = random.Random(4)
    prompt = [rng.randrange(3, 500) for _ in range(long_len)]
    hf = hf_causal_lm(str(model_dir), dtype=torch.float32).eval()
    with caplog.at_level(logging.INFO, logger="weir.engine"):
        runner = _runner(model_dir, long_len)
    assert f"dynamic rope: one NTK base for max_model_len {long_len}" in caplog.text
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0]
        theirs_short = hf(torch.tensor([prompt[:20]])).logits[0]
    assert (_logits(runner, prompt) - theirs).abs().max().item() < 1e-4
    assert (_logits(runner, prompt[:20]) - theirs_short).abs().max().item() > 1e-3
