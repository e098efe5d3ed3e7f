"""ModelConfig's reading of sliding-window layers and the Gemma families' settings from config.json as
the Hub ships them (transformers < 5 names) and as transformers >= 5 saves them, with transformers'
defaults where a key is missing, and its refusals naming the field and value. No model is built."""

from __future__ import annotations

from typing import Any

import pytest

from engine.model_config import ModelConfig

BASE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
}


def _config(arch: str, **cfg: Any) -> ModelConfig:
    return ModelConfig.from_dicts("/m", {**BASE, "architectures": [arch], **cfg}, device="cpu")


def _windows(config: ModelConfig) -> list[int | None]:
    return [config.layer_window(i) for i in range(config.num_layers)]


def test_gemma2_as_the_hub_ships_it() -> None:
    """gemma-2-2b's config.json keys: sliding on even layers, softcaps, query_pre_attn_scalar, tied."""
    c = _config(
        "Gemma2ForCausalLM", num_hidden_layers=4, head_dim=16, sliding_window=4096, query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0, cache_implementation="hybrid",
    )  # fmt: skip
    assert _windows(c) == [4096, None, 4096, None] and c.max_model_len == 8192
    assert (c.attn_logit_softcapping, c.final_logit_softcapping, c.query_pre_attn_scalar) == (
        50.0,
        30.0,
        256.0,
    )
    assert c.tie_word_embeddings and c.hidden_act == "gelu_pytorch_tanh" and not c.qk_norm
    # transformers' class defaults where config.json leaves the keys out
    bare = _config("Gemma2ForCausalLM", num_hidden_layers=2, head_dim=16)
    assert (bare.attn_logit_softcapping, bare.final_logit_softcapping, bare.query_pre_attn_scalar) == (
        50.0,
        30.0,
        256.0,
    )
    assert _windows(bare) == [4096, None]
    none = _config(
        "Gemma2ForCausalLM", num_hidden_layers=2, attn_logit_softcapping=None, final_logit_softcapping=None
    )
    assert none.attn_logit_softcapping is None and none.final_logit_softcapping is None


def test_gemma3_ropes_and_layer_pattern_in_both_formats() -> None:
    legacy = _config(
        "Gemma3ForCausalLM", num_hidden_layers=12, head_dim=16, sliding_window=512, sliding_window_pattern=6,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
    )  # fmt: skip
    assert [i for i, w in enumerate(_windows(legacy)) if w is None] == [5, 11]  # every 6th layer global
    assert legacy.layer_rope(0) == (10_000.0, None)
    assert legacy.layer_rope(5) == (1_000_000.0, {"rope_type": "linear", "factor": 8.0})
    assert legacy.qk_norm and legacy.attn_logit_softcapping is None and legacy.final_logit_softcapping is None
    saved = _config(
        "Gemma3ForCausalLM", num_hidden_layers=3, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )  # fmt: skip
    assert _windows(saved) == [8, None, 8]
    assert saved.layer_rope(0) == (1e4, None) and saved.layer_rope(1) == (
        1e6,
        {"rope_type": "linear", "factor": 2.0},
    )


def test_qwen_windows_from_max_window_layers_or_layer_types() -> None:
    qwen = _config(
        "Qwen2ForCausalLM",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=64,
        max_window_layers=1,
    )
    assert _windows(qwen) == [None, 64, 64] and qwen.max_model_len == 8192
    off = _config("Qwen3ForCausalLM", num_hidden_layers=3, use_sliding_window=False, sliding_window=64)
    assert _windows(off) == [None, None, None] and off.sliding_window is None
    typed = _config(
        "Qwen3ForCausalLM", num_hidden_layers=2, use_sliding_window=True, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    assert _windows(typed) == [64, None]
    mistral = _config("MistralForCausalLM", num_hidden_layers=2, sliding_window=32)  # every layer
    assert _windows(mistral) == [32, 32] and mistral.max_model_len == 8192
    # a window holding every position the model serves is no window: the kernels compiled without one
    short = ModelConfig.from_dicts(
        "/m", {**BASE, "architectures": ["MistralForCausalLM"], "num_hidden_layers": 2, "sliding_window": 32},
        max_model_len=32, device="cpu",
    )  # fmt: skip
    assert _windows(short) == [None, None] and short.sliding_window == 32


def test_gemma1_reads_gelu_as_the_tanh_approximation() -> None:
    c = _config("GemmaForCausalLM", num_hidden_layers=2, head_dim=16, hidden_act="gelu")
    assert c.hidden_act == "gelu_pytorch_tanh" and c.tie_word_embeddings and _windows(c) == [None, None]
    assert c.query_pre_attn_scalar is None and c.attn_logit_softcapping is None


@pytest.mark.parametrize(
    ("arch", "cfg", "message"),
    [
        (
            "Gemma3ForConditionalGeneration",
            {"num_hidden_layers": 2},
            "unsupported model architecture Gemma3ForConditionalGeneration in /m: Gemma 3's multimodal (image + "
            "text) checkpoints are not supported; text-only Gemma 3 checkpoints (architecture Gemma3ForCausalLM, "
            "e.g. gemma-3-1b) are",
        ),
        (
            "Gemma3ForCausalLM",
            {"num_hidden_layers": 2, "use_bidirectional_attention": True},
            "unsupported use_bidirectional_attention true in /m: weir generates text, with causal attention only",
        ),
        (
            "Gemma2ForCausalLM",
            {"num_hidden_layers": 2, "hidden_activation": "gelu"},
            "unsupported hidden_activation 'gelu' in /m; only 'gelu_pytorch_tanh' is supported",
        ),
        (
            "LlamaForCausalLM",
            {"num_hidden_layers": 2, "hidden_act": "gelu"},
            "unsupported hidden_act 'gelu' in /m; only 'silu' is supported",
        ),
        (
            "Gemma2ForCausalLM",
            {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "chunked_attention"]},
            "unsupported layer_types ['sliding_attention', 'chunked_attention'] in /m/config.json: expected 2 entries "
            "(num_hidden_layers), each 'full_attention' or 'sliding_attention'",
        ),
        (
            "Gemma2ForCausalLM",
            {"num_hidden_layers": 2, "attn_logit_softcapping": -1},
            "attn_logit_softcapping must be a positive number or null; got -1 in /m",
        ),
        (
            "Qwen2ForCausalLM",
            {
                "num_hidden_layers": 2,
                "use_sliding_window": True,
                "sliding_window": 1.5,
                "max_window_layers": 0,
            },
            "sliding_window in /m/config.json must be a positive integer or null; got 1.5",
        ),
    ],
    ids=["multimodal", "bidirectional", "gelu-exact", "llama-gelu", "layer-types", "softcap", "window"],
)
def test_refusals_name_the_field_and_value(arch: str, cfg: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        _config(arch, **cfg)
    assert str(err.value) == message
