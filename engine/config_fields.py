"""Typed reads of config.json fields for ModelConfig: a missing key takes the value transformers'
config class of that family gives it, and a wrong-typed or out-of-range value is refused with a
message naming the field, the value and the file, so no model is built from a config that
transformers would read differently (or not at all), and no KeyError/TypeError/ZeroDivisionError
escapes from a bad checkpoint.

Plain Python, no torch.
"""

from __future__ import annotations

from typing import Any

# transformers 5's config-class defaults where they differ from the Llama ones (num_key_value_heads
# = num_attention_heads, head_dim = hidden_size // num_attention_heads, rms_norm_eps 1e-6, rope_theta
# 1e4, max_position_embeddings 2048, no sliding window): a config.json that leaves one of these keys
# out gets the value transformers (and so vLLM) would build the model with. A key present with null
# keeps its meaning (e.g. Mistral's "sliding_window": null is no window, num_key_value_heads null
# is multi-head attention).
# GPT2Config's (and GPTBigCodeConfig's) under GPT-2's own names: engine.model_config._gpt2_keys maps them
_GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "layer_norm_epsilon": 1e-5,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}
TRANSFORMERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "Mistral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "sliding_window": 4096},
    "Mixtral": {
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 131072,
    },
    "Qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "sliding_window": 4096},
    "Qwen3": {
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
    },
    "Qwen2Moe": {"num_key_value_heads": 16, "max_position_embeddings": 32768, "sliding_window": 4096},
    "Qwen3Moe": {"num_key_value_heads": 4, "max_position_embeddings": 32768, "sliding_window": 4096},
    "Phi3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    "Olmo2": {"rms_norm_eps": 1e-5},
    "Olmo3": {"rms_norm_eps": 1e-5, "sliding_window": 4096},
    "Olmoe": {
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "eos_token_id": 50279,
    },
    "Ministral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "sliding_window": 4096},
    "SeedOss": {"num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 524288},
    "StableLm": {"num_key_value_heads": 32, "max_position_embeddings": 4096},
    **{
        family: {
            "num_key_value_heads": 2,
            "head_dim": 128,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1.5625e-07,
            "attention_bias": True,
            "eos_token_id": [151329, 151336, 151338],
        }
        for family in ("Glm", "Glm4")
    },
    "Cohere": {"max_position_embeddings": 8192, "eos_token_id": 255001},
    "Arcee": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "Apertus": {"max_position_embeddings": 65536, "rms_norm_eps": 1e-5},
    "Exaone4": {
        "num_key_value_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "sliding_window": 4096,
    },
    "Helium": {
        "num_key_value_heads": 20,
        "head_dim": 128,
        "rms_norm_eps": 1e-8,
        "max_position_embeddings": 4096,
        "rope_theta": 100_000.0,
    },
    "Ernie4_5": {
        "num_key_value_heads": 2,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_theta": 500_000.0,
    },
    "Cohere2": {"max_position_embeddings": 8192, "eos_token_id": 255001, "sliding_window": 4096},
    "Starcoder2": {"num_key_value_heads": 2, "max_position_embeddings": 4096},
    "OPT": {
        "vocab_size": 50272,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "ffn_dim": 3072,
        "max_position_embeddings": 2048,
        "bos_token_id": 2,
        "eos_token_id": 2,
    },
    "GPTBigCode": _GPT2_DEFAULTS,  # GPTBigCodeConfig's are GPT2Config's
    "GPTJ": {  # (GPT-2's kind of names, mapped the same way)
        "vocab_size": 50400,
        "n_positions": 2048,
        "n_embd": 4096,
        "n_layer": 28,
        "n_head": 16,
        "rotary_dim": 64,
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    },
    "GPT2": _GPT2_DEFAULTS,
    "SmolLM3": {"num_key_value_heads": 4, "max_position_embeddings": 32768, "rope_theta": 2_000_000.0},
    "GraniteMoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "GraniteMoeShared": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "GraniteMoeHybrid": {"num_local_experts": 8, "num_experts_per_tok": 2, "shared_intermediate_size": 1024},
    "Gemma": {"num_key_value_heads": 16, "head_dim": 256, "max_position_embeddings": 8192},
    "Gemma2": {
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "sliding_window": 4096,
    },
    "Gemma3": {
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
    },
}


def with_family_defaults(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with transformers' class defaults of `family` filled in for the keys it leaves out."""
    return {**TRANSFORMERS_DEFAULTS.get(family, {}), **cfg}


def config_file(model_path: str) -> str:
    return f"{model_path}/config.json"


def positive_int(value: Any, name: str, model_path: str) -> int:
    """`value` as a positive integer (not a bool, not a float), else a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} in {config_file(model_path)} must be a positive integer; got {value!r}")
    return value


def int_field(cfg: dict[str, Any], name: str, model_path: str, default: int | None = None) -> int:
    """cfg[name] (or `default` where the key is missing or null) as a positive integer."""
    value = cfg.get(name)
    return positive_int(default if value is None else value, name, model_path)


def positive_number(value: Any, name: str, model_path: str) -> float:
    """`value` as a positive finite float (ints accepted, bools and strings not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} in {config_file(model_path)} must be a positive number; got {value!r}")
    return float(value)


def bool_field(cfg: dict[str, Any], name: str, model_path: str, default: bool) -> bool:
    """cfg[name] as a bool (missing or null: `default`); "false" or 0 are refused, not read as truthy."""
    value = cfg.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{name} in {config_file(model_path)} must be true or false; got {value!r}")
    return value
