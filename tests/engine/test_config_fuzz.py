"""config.json fuzzing for the model families: a missing key reads as transformers' config class of
that family reads it (compared with the class itself), and a wrong-typed or out-of-range value is
refused at start with a message naming the field, the value and the file, never a KeyError,
TypeError or ZeroDivisionError and never a model built differently from transformers'. No model is
built."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from engine.model_config import ModelConfig
from tests.tiny_models import make_config

ARCHITECTURES = {
    "mistral_window": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_window": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "phi3_partial": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "granite_moe": "GraniteMoeForCausalLM",
    "granite_moe_shared": "GraniteMoeSharedForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "olmo": "OlmoForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "phi": "PhiForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "olmo3": "Olmo3ForCausalLM",
    "ministral": "MinistralForCausalLM",
    "seed_oss": "SeedOssForCausalLM",
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "cohere": "CohereForCausalLM",
    "cohere2": "Cohere2ForCausalLM",
    "helium": "HeliumForCausalLM",
    "ernie4_5": "Ernie4_5ForCausalLM",
    "exaone4": "Exaone4ForCausalLM",
    "arcee": "ArceeForCausalLM",
    "apertus": "ApertusForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gptj": "GPTJForCausalLM",
    "opt": "OPTForCausalLM",
    "gpt_bigcode": "GPTBigCodeForCausalLM",
    "granite4_moe": "GraniteMoeHybridForCausalLM",
    "granite4_dense": "GraniteMoeHybridForCausalLM",
    "qwen2_yarn": "Qwen2ForCausalLM",
    "llama_dynamic": "LlamaForCausalLM",
}
F = "/m/config.json"


def _cfg(family: str) -> dict[str, Any]:
    """The tiny family's config.json as save_pretrained writes it (only non-default keys)."""
    cfg = json.loads(make_config(family).to_json_string(use_diff=True))
    return {**cfg, "architectures": [ARCHITECTURES[family]]}


def _read(cfg: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dicts("/m", cfg, device="cpu")


def _theirs(config_class: type, cfg: dict[str, Any], drop: tuple[str, ...] = ()) -> Any:
    """The same config.json as transformers' config class reads it (less `architectures`, which no class
    takes, and `drop`)."""
    return config_class(**{k: v for k, v in cfg.items() if k != "architectures" and k not in drop})


def _set(family: str, drop: tuple[str, ...] = (), **values: Any) -> dict[str, Any]:
    cfg = {k: v for k, v in _cfg(family).items() if k not in drop}
    return {**cfg, **values}


def _longrope(**changes: Any) -> dict[str, Any]:
    cfg = _cfg("phi3_partial")
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "factor": 2.0, **changes}
    cfg.pop("original_max_position_embeddings")
    return cfg


def _rope(family: str, drop: str = "", **changes: Any) -> dict[str, Any]:
    """The family's config.json with its rope_parameters changed (and `drop` left out)."""
    cfg = _cfg(family)
    rope = {**cfg["rope_parameters"], **changes}
    cfg["rope_parameters"] = {k: v for k, v in rope.items() if k != drop}
    return cfg


REFUSALS = [
    (_set("granite_moe_shared", shared_intermediate_size=-8), f"shared_intermediate_size in {F} must be a positive integer; got -8"),
    (_set("stablelm", qk_layernorm=True), f"unsupported qk_layernorm true in {F} for StableLmForCausalLM: weir serves the sequential-residual StableLM layout without per-head q/k LayerNorms"),
    (_set("stablelm", use_parallel_residual=True), f"unsupported use_parallel_residual true in {F} for StableLmForCausalLM: weir serves the sequential-residual StableLM layout without per-head q/k LayerNorms"),
    (_set("starcoder2", hidden_act="silu"), "unsupported hidden_act 'silu' in /m; only 'gelu_new' or 'gelu_pytorch_tanh' or 'gelu_fast' or 'gelu' is supported"),
    (_set("starcoder2", norm_epsilon=0), f"norm_epsilon in {F} must be a positive number; got 0"),
    (_set("starcoder2", use_bias="yes"), f"use_bias in {F} must be true or false; got 'yes'"),
    (_set("starcoder2", sliding_window=0), f"sliding_window in {F} must be a positive integer or null; got 0"),
    (_set("phi", qk_layernorm=True), f"unsupported qk_layernorm true in {F} for PhiForCausalLM: weir serves Phi without per-head q/k LayerNorms"),
    (_set("phi", hidden_act="relu"), "unsupported hidden_act 'relu' in /m; only 'gelu_new' or 'gelu_pytorch_tanh' or 'gelu_fast' or 'gelu' is supported"),
    (_set("phi", layer_norm_eps=-1e-5), f"layer_norm_eps in {F} must be a positive number; got -1e-05"),
    (_set("gpt_neox", use_parallel_residual="no"), f"use_parallel_residual in {F} must be true or false; got 'no'"),
    (_set("gpt_neox", attention_bias=1), f"attention_bias in {F} must be true or false; got 1"),
    (_set("gpt_neox", hidden_act="relu"), "unsupported hidden_act 'relu' in /m; only 'gelu_new' or 'gelu_pytorch_tanh' or 'gelu_fast' or 'gelu' is supported"),
    (_set("smollm3", no_rope_layers=[1]), f"no_rope_layers in {F} must be a list of 2 entries (num_hidden_layers), each 1 (rotary) or 0 (no position embedding); got [1]"),
    (_set("smollm3", no_rope_layers=[1, 2]), f"no_rope_layers in {F} must be a list of 2 entries (num_hidden_layers), each 1 (rotary) or 0 (no position embedding); got [1, 2]"),
    (_set("olmo3", sliding_window=None), f"sliding_window in {F} must be a positive integer; got None"),
    (_set("seed_oss", attention_out_bias="no"), f"attention_out_bias in {F} must be true or false; got 'no'"),
    (_set("ministral", sliding_window=0), f"sliding_window in {F} must be a positive integer or null; got 0"),
    (_set("olmo", clip_qkv=0), "clip_qkv must be a positive number or null; got 0 in /m"),
    (_set("olmo", clip_qkv="8"), "clip_qkv must be a positive number or null; got '8' in /m"),
    (_set("mixtral", drop=("intermediate_size",)), f"intermediate_size in {F} must be a positive integer; got None"),
    (_set("mixtral", num_attention_heads=0), f"num_attention_heads in {F} must be a positive integer; got 0"),
    (_set("gemma2", num_key_value_heads=-2), f"num_key_value_heads in {F} must be a positive integer; got -2"),
    (_set("mixtral", num_key_value_heads=3), f"num_attention_heads (4) in {F} must be a multiple of num_key_value_heads (3)"),
    (_set("gemma3", hidden_size="64"), f"hidden_size in {F} must be a positive integer; got '64'"),
    (_set("qwen3_moe", num_hidden_layers=2.0), f"num_hidden_layers in {F} must be a positive integer; got 2.0"),
    (_set("gemma2", head_dim=15), f"head_dim 15 in {F} must be even: rotary embeddings turn pairs of dims"),
    (_set("mixtral", rms_norm_eps="1e-5"), f"rms_norm_eps in {F} must be a positive number; got '1e-5'"),
    (_set("mistral_window", sliding_window=-5), f"sliding_window in {F} must be a positive integer or null; got -5"),
    (_set("mistral_window", sliding_window=True), f"sliding_window in {F} must be a positive integer or null; got True"),
    (_set("mixtral", sliding_window=0), f"sliding_window in {F} must be a positive integer or null; got 0"),
    (_set("phi3", sliding_window=10.5), f"sliding_window in {F} must be a positive integer or null; got 10.5"),
    (_set("qwen3_moe", use_sliding_window=True, sliding_window=0), f"sliding_window in {F} must be a positive integer or null; got 0"),
    (_set("gemma2", sliding_window=0), f"sliding_window in {F} must be a positive integer; got 0"),
    (_set("gemma2", sliding_window=None), f"sliding_window in {F} must be a positive integer; got None"),
    (_set("qwen3_moe", use_sliding_window="no", sliding_window=8), f"use_sliding_window in {F} must be true or false; got 'no'"),
    (_set("qwen2_moe", use_sliding_window=True, sliding_window=8, max_window_layers="x"), f"max_window_layers in {F} must be a non-negative integer; got 'x'"),
    (_set("gemma2", layer_types=5), f"unsupported layer_types 5 in {F}: expected 3 entries (num_hidden_layers), each 'full_attention' or 'sliding_attention'"),
    (_set("gemma3", drop=("layer_types",), sliding_window_pattern=0), f"sliding_window_pattern in {F} must be a positive integer; got 0"),
    (_set("qwen3_moe", mlp_only_layers=[5]), f"mlp_only_layers in {F} must be a list of layer indices in [0, 2); got [5]"),
    (_set("qwen2_moe", mlp_only_layers=[-1]), f"mlp_only_layers in {F} must be a list of layer indices in [0, 2); got [-1]"),
    (_set("qwen3_moe", norm_topk_prob="false"), f"norm_topk_prob in {F} must be true or false; got 'false'"),
    (_set("qwen2_moe", decoder_sparse_step=0), f"decoder_sparse_step in {F} must be a positive integer; got 0"),
    (_set("qwen3_moe", moe_intermediate_size="48"), f"moe_intermediate_size in {F} must be a positive integer; got '48'"),
    (_set("mixtral", drop=("num_experts_per_tok",)), f"num_experts_per_tok in {F} must be a positive integer; got None"),
    (_set("phi3", partial_rotary_factor=[0.5]), f"partial_rotary_factor in {F} must be a positive number; got [0.5]"),
    (_set("phi3", partial_rotary_factor=True), f"partial_rotary_factor in {F} must be a positive number; got True"),
    (_longrope(factor="x"), f"longrope factor in {F} must be a positive number; got 'x'"),
    (_longrope(attention_factor="x"), f"longrope attention_factor in {F} must be a positive number; got 'x'"),
    (_longrope(original_max_position_embeddings=1), f"longrope original_max_position_embeddings in {F} must be an integer of at least 2; got 1"),
    (_longrope(original_max_position_embeddings="x"), f"longrope original_max_position_embeddings in {F} must be an integer of at least 2; got 'x'"),
    (_longrope(short_factor=["a"] * 6), "rope scaling 'longrope' in /m: short_factor must be a list of rotary_dim / 2 = 6 numbers; got 'a' at index 0"),
    (_longrope(rope_theta="x"), f"rope_theta in {F} must be a positive number; got 'x'"),
    (_set("granite", logits_scaling=0), f"logits_scaling in {F} must be a positive number; got 0"),
    (_set("granite", residual_multiplier="0.22"), f"residual_multiplier in {F} must be a positive number; got '0.22'"),
    (_set("granite", embedding_multiplier=-12.0), f"embedding_multiplier in {F} must be a positive number; got -12.0"),
    (_set("granite", attention_multiplier=True), f"attention_multiplier in {F} must be a positive number; got True"),
    (_set("granite_moe", num_local_experts=0), f"num_local_experts in {F} must be a positive integer; got 0"),
    (_set("granite_moe", logits_scaling=-8), f"logits_scaling in {F} must be a positive number; got -8"),
    (_set("granite", hidden_act="gelu"), "unsupported hidden_act 'gelu' in /m; only 'silu' is supported"),
    (_set("olmo2", rope_parameters={"rope_type": "ntk", "factor": 2.0}), "unsupported rope_type 'ntk' in /m; supported: default, linear, llama3, longrope, yarn, dynamic"),
    (_rope("qwen2_yarn", factor="4"), f"yarn factor in {F} must be a positive number; got '4'"),
    (_rope("qwen2_yarn", factor=0), f"yarn factor in {F} must be a positive number; got 0"),
    (_rope("qwen2_yarn", factor=-4.0), f"yarn factor in {F} must be a positive number; got -4.0"),
    (_rope("qwen2_yarn", factor=True), f"yarn factor in {F} must be a positive number; got True"),
    (_rope("qwen2_yarn", drop="factor"), "rope scaling 'yarn' in /m is missing 'factor'"),
    (_rope("qwen2_yarn", original_max_position_embeddings=0), f"yarn original_max_position_embeddings in {F} must be a positive integer; got 0"),
    (_rope("qwen2_yarn", original_max_position_embeddings="32"), f"yarn original_max_position_embeddings in {F} must be a positive integer; got '32'"),
    (_set("qwen2_yarn", original_max_position_embeddings=32.5), f"yarn original_max_position_embeddings in {F} must be a positive integer; got 32.5"),
    (_rope("qwen2_yarn", beta_fast="fast"), f"yarn beta_fast in {F} must be a positive number; got 'fast'"),
    (_rope("qwen2_yarn", beta_slow=0), f"yarn beta_slow in {F} must be a positive number; got 0"),
    (_rope("qwen2_yarn", beta_fast=1, beta_slow=2), f"yarn beta_fast (1.0) in {F} must be at least beta_slow (2.0)"),
    (_rope("qwen2_yarn", beta_fast=0.5), f"yarn beta_fast (0.5) in {F} must be at least beta_slow (1.0)"),
    (_rope("qwen2_yarn", mscale=-1), f"yarn mscale in {F} must be a non-negative number or null; got -1"),
    (_rope("qwen2_yarn", mscale_all_dim="1"), f"yarn mscale_all_dim in {F} must be a non-negative number or null; got '1'"),
    (_rope("qwen2_yarn", attention_factor=0.0), f"yarn attention_factor in {F} must be a positive number; got 0.0"),
    (_rope("qwen2_yarn", truncate="no"), f"yarn truncate in {F} must be true or false; got 'no'"),
    (_rope("qwen2_yarn", truncate=None), f"yarn truncate in {F} must be true or false; got None"),
    (_rope("llama_dynamic", factor="2.0"), f"dynamic factor in {F} must be a positive number; got '2.0'"),
    (_rope("llama_dynamic", factor=None), f"dynamic factor in {F} must be a positive number; got None"),
    (_rope("llama_dynamic", factor=-2), f"dynamic factor in {F} must be a positive number; got -2"),
    (_rope("llama_dynamic", drop="factor"), "rope scaling 'dynamic' in /m is missing 'factor'"),
    (_rope("llama_dynamic", rope_theta=[1e4]), f"rope_theta in {F} must be a positive number; got [10000.0]"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("cfg", "message"), REFUSALS, ids=[m.split(" in ")[0] + f"-{i}" for i, (_, m) in enumerate(REFUSALS)]
)
def test_bad_values_are_refused_naming_field_value_and_file(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        _read(copy.deepcopy(cfg))
    assert str(err.value) == message


# Keys a real config.json may leave out whose transformers default is not the Llama one.
MISSING = {
    "mistral_window": ("num_key_value_heads", "sliding_window", "max_position_embeddings"),
    "mixtral": ("num_key_value_heads", "rms_norm_eps", "rope_parameters", "max_position_embeddings"),
    "qwen2_moe": ("num_key_value_heads",),
    "qwen3_moe": ("num_key_value_heads",),
    "qwen3": ("head_dim", "num_key_value_heads"),
    "qwen2_window": ("num_key_value_heads", "sliding_window"),
    "phi3": ("rms_norm_eps", "max_position_embeddings"),
    "gemma": ("head_dim", "num_key_value_heads"),
    "gemma2": ("head_dim", "num_key_value_heads", "sliding_window"),
    "gemma3": ("head_dim", "num_key_value_heads", "sliding_window", "max_position_embeddings"),
    "granite": ("num_key_value_heads", "rms_norm_eps", "max_position_embeddings"),
    "granite_moe": ("num_key_value_heads", "rms_norm_eps", "max_position_embeddings"),
    "olmo2": ("num_key_value_heads", "rms_norm_eps", "max_position_embeddings"),
    "olmoe": ("num_key_value_heads", "rms_norm_eps", "max_position_embeddings"),
}


def _transformers_view(config: Any) -> dict[str, Any]:
    rope = config.rope_parameters
    rope = rope.get("full_attention", rope)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return {
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": float(rope["rope_theta"]),
        "max_position_embeddings": config.max_position_embeddings,
        "windows": [window if window and t == "sliding_attention" else None for t in types],
    }


@pytest.mark.parametrize("family", sorted(MISSING))
def test_missing_keys_read_as_transformers_reads_them(family: str) -> None:
    """Each key of MISSING left out of the tiny config.json: weir's value is the one transformers'
    config class of the family gives (num_key_value_heads, head_dim, rms_norm_eps, rope_theta,
    max_position_embeddings, the per-layer windows)."""
    config_class = type(make_config(family))
    for key in MISSING[family]:
        cfg = {k: v for k, v in _cfg(family).items() if k != key}
        if key == "sliding_window" and family == "qwen2_window":
            cfg["use_sliding_window"] = True
        if key == "num_key_value_heads":  # a multiple of every family's default (4, 8, 16 or 32)
            cfg["num_attention_heads"] = 32
        theirs = _transformers_view(_theirs(config_class, cfg))
        ours = _read(cfg)
        got = {
            "num_kv_heads": ours.num_kv_heads,
            "head_dim": ours.head_dim,
            "rms_norm_eps": ours.rms_norm_eps,
            "rope_theta": ours.rope_theta,
            "max_position_embeddings": ours.max_position_embeddings,
            "windows": [ours.sliding_window if t == "sliding_attention" else None for t in ours.layer_types]
            or [None] * ours.num_layers,
        }
        assert got == theirs, key


GRANITE_SCALINGS = ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier")


def test_granite_scalings_read_as_transformers_reads_them() -> None:
    """The tiny Granite's four scalings as written, and each left out: transformers' GraniteConfig
    default (1.0; the attention multiplier then the softmax scale 1.0, not head_dim ** -0.5)."""
    from transformers import GraniteConfig

    ours = _read(_cfg("granite"))
    assert [getattr(ours, k) for k in GRANITE_SCALINGS] == [12.0, 0.22, 8.0, 0.09]
    for key in GRANITE_SCALINGS:
        cfg = {k: v for k, v in _cfg("granite").items() if k != key}
        theirs = getattr(_theirs(GraniteConfig, cfg), key)
        assert getattr(_read(cfg), key) == theirs == 1.0, key
    llama = _read({**_cfg("granite"), "architectures": ["LlamaForCausalLM"]})  # only Granite reads them
    assert [getattr(llama, k) for k in GRANITE_SCALINGS] == [1.0, 1.0, 1.0, None]


def test_granite_moe_expert_counts_default_as_transformers() -> None:
    """num_local_experts and num_experts_per_tok left out: GraniteMoeConfig's 8 and 2."""
    from transformers import GraniteMoeConfig

    cfg = _set("granite_moe", drop=("num_local_experts", "num_experts_per_tok"))
    theirs = _theirs(GraniteMoeConfig, cfg)
    ours = _read(cfg)
    assert (ours.num_experts, ours.num_experts_per_tok) == (
        theirs.num_local_experts,
        theirs.num_experts_per_tok,
    )
    assert (ours.num_experts, ours.num_experts_per_tok) == (8, 2)


def test_olmo_clip_qkv_is_read_for_olmo_only() -> None:
    """OLMo 1's clip_qkv as written (the tiny one's 0.5), None when left out (OlmoConfig's default),
    and not read for another family (Llama has no such clamp)."""
    assert _read(_cfg("olmo")).clip_qkv == 0.5
    assert _read(_set("olmo", drop=("clip_qkv",))).clip_qkv is None
    assert _read({**_cfg("olmo"), "architectures": ["LlamaForCausalLM"]}).clip_qkv is None


def test_granite_moe_shared_mlp_size_is_read_and_zero_means_none() -> None:
    """GraniteMoeShared's shared_intermediate_size as written (the tiny one's 40, an ungated shared
    expert), and 0 or left out (GraniteMoeSharedConfig's default 0): no shared MLP, GraniteMoe's block."""
    ours = _read(_cfg("granite_moe_shared"))
    assert (ours.shared_expert_intermediate_size, ours.shared_expert_gated) == (40, False)
    assert _read(_set("granite_moe_shared", shared_intermediate_size=0)).shared_expert_intermediate_size == 0
    assert (
        _read(_set("granite_moe_shared", drop=("shared_intermediate_size",))).shared_expert_intermediate_size
        == 0
    )
    assert _read(_cfg("qwen2_moe")).shared_expert_gated is True


def test_stablelm_partial_rotary_and_biases_read_as_transformers() -> None:
    """StableLM's partial_rotary_factor as written (0.25 of head_dim 16: 4 dims), its default 0.25 when
    left out, use_qkv_bias, and StableLmConfig's defaults for the keys a config may omit."""
    from transformers import StableLmConfig

    ours = _read(_cfg("stablelm"))
    assert (ours.rotary_dim, ours.qkv_bias, ours.o_proj_bias, ours.layer_norm_eps) == (4, True, False, 1e-5)
    cfg = {k: v for k, v in _cfg("stablelm").items() if k not in ("partial_rotary_factor", "rope_parameters")}
    assert _read(cfg).rotary_dim == 4
    bare = _set(  # 32 heads of 16 (a multiple of StableLmConfig's default 32 KV heads)
        "stablelm",
        drop=("num_key_value_heads", "max_position_embeddings"),
        num_attention_heads=32,
        hidden_size=512,
    )
    theirs = _theirs(StableLmConfig, bare)
    assert (_read(bare).num_kv_heads, _read(bare).max_position_embeddings) == (
        theirs.num_key_value_heads,
        theirs.max_position_embeddings,
    )


def test_starcoder2_biases_norm_window_and_tying_read_as_transformers() -> None:
    """StarCoder2's one use_bias for every projection (default true), norm_epsilon, hidden_act (default the
    tanh GELU), its window on every layer, the tied embedding by default, and Starcoder2Config's
    defaults for the keys a config may omit."""
    from transformers import Starcoder2Config

    ours = _read(_cfg("starcoder2"))
    assert (ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias) == (True, True, True)
    assert (ours.layer_norm_eps, ours.hidden_act, ours.tie_word_embeddings) == (
        1e-5,
        "gelu_pytorch_tanh",
        True,
    )
    assert ours.layer_types == ("sliding_attention",) * ours.num_layers and ours.sliding_window == 12
    unbiased = _read(_set("starcoder2", use_bias=False, norm_epsilon=1e-3, hidden_act="gelu"))
    assert (unbiased.qkv_bias, unbiased.o_proj_bias, unbiased.mlp_bias) == (False, False, False)
    assert (unbiased.layer_norm_eps, unbiased.hidden_act) == (1e-3, "gelu")
    bare = _set(  # 32 heads of 16 (a multiple of Starcoder2Config's default 2 KV heads)
        "starcoder2",
        drop=("num_key_value_heads", "max_position_embeddings", "use_bias", "norm_epsilon", "hidden_act",
              "tie_word_embeddings", "sliding_window"),
        num_attention_heads=32,
        hidden_size=512,
    )  # fmt: skip
    theirs = _theirs(Starcoder2Config, bare)
    mine = _read(bare)
    assert (mine.num_kv_heads, mine.max_position_embeddings, mine.layer_norm_eps, mine.qkv_bias) == (
        theirs.num_key_value_heads,
        theirs.max_position_embeddings,
        theirs.norm_epsilon,
        theirs.use_bias,
    )
    assert (mine.hidden_act, mine.tie_word_embeddings, mine.sliding_window) == (
        theirs.hidden_act,
        theirs.tie_word_embeddings,
        theirs.sliding_window,
    )


def test_phi_partial_rotary_biases_and_head_read_as_transformers() -> None:
    """Phi's partial_rotary_factor as written (0.4 of head_dim 16: 6 dims) and PhiConfig's default 0.5 when
    left out, biases on every projection and the LM head, gelu_new by default, layer_norm_eps, and the
    defaults for the keys a config may omit."""
    from transformers import PhiConfig

    ours = _read(_cfg("phi"))
    assert (ours.rotary_dim, ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias, ours.lm_head_bias) == (
        6, True, True, True, True
    )  # fmt: skip
    assert (ours.hidden_act, ours.layer_norm_eps, ours.tie_word_embeddings) == ("gelu_new", 1e-5, False)
    bare = _set("phi", drop=("partial_rotary_factor", "rope_parameters", "num_key_value_heads", "hidden_act"))
    theirs = _theirs(PhiConfig, bare)
    mine = _read(bare)
    assert mine.rotary_dim == int(16 * theirs.rope_parameters["partial_rotary_factor"]) == 8
    assert (mine.num_kv_heads, mine.hidden_act) == (theirs.num_key_value_heads, theirs.hidden_act)
    assert _read(_cfg("starcoder2")).lm_head_bias is False


def test_gpt_neox_rope_keys_residual_and_biases_read_as_transformers() -> None:
    """GPT-NeoX's rotary_pct / rotary_emb_base (its configs' own names) or rope_parameters, its default
    quarter of each head, use_parallel_residual (default true), attention_bias on query_key_value and
    dense (the MLP's always), gelu by default, as transformers' GPTNeoXConfig reads them."""
    from transformers import GPTNeoXConfig

    ours = _read(_cfg("gpt_neox"))
    assert (ours.rotary_dim, ours.parallel_residual, ours.hidden_act) == (4, True, "gelu")
    assert (ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias, ours.num_kv_heads) == (True, True, True, 4)
    legacy = _set("gpt_neox", drop=("rope_parameters",), rotary_pct=0.5, rotary_emb_base=500)
    theirs = _theirs(GPTNeoXConfig, legacy)
    mine = _read(legacy)
    assert mine.rotary_dim == int(16 * theirs.rope_parameters["partial_rotary_factor"]) == 8
    assert mine.rope_theta == theirs.rope_parameters["rope_theta"] == 500.0
    bare = _set("gpt_neox", drop=("rope_parameters", "use_parallel_residual", "hidden_act"))
    theirs = _theirs(GPTNeoXConfig, bare)
    mine = _read(bare)
    assert (mine.rotary_dim, mine.parallel_residual, mine.hidden_act) == (
        int(16 * theirs.rope_parameters["partial_rotary_factor"]),
        theirs.use_parallel_residual,
        theirs.hidden_act,
    )
    unbiased = _read(_set("gpt_neox", attention_bias=False, use_parallel_residual=False))
    assert (unbiased.qkv_bias, unbiased.o_proj_bias, unbiased.mlp_bias, unbiased.parallel_residual) == (
        False, False, True, False
    )  # fmt: skip


def test_smollm3_nope_layers_windows_and_defaults_read_as_transformers() -> None:
    """SmolLM3's NoPE layers (no_rope_layers, or every no_rope_layer_interval-th layer), its windows on
    the NoPE layers when use_sliding_window, and SmolLM3Config's defaults (4 KV heads, 32,768 positions,
    rope_theta 2e6, tied embeddings) for the keys a config may omit."""
    from transformers import SmolLM3Config

    def theirs(cfg: dict[str, Any]) -> Any:
        return _theirs(SmolLM3Config, cfg)

    for cfg in (
        _set("smollm3"),
        _set("smollm3", drop=("no_rope_layers",), no_rope_layer_interval=1),
        _set(
            "smollm3", num_hidden_layers=8, drop=("no_rope_layers", "no_rope_layer_interval", "layer_types")
        ),
        _set("smollm3", drop=("layer_types",), use_sliding_window=True, sliding_window=6),
        _set(
            "smollm3", drop=("layer_types",), use_sliding_window=True, sliding_window=6, no_rope_layers=[0, 0]
        ),
    ):
        ours, ref = _read(cfg), theirs(cfg)
        assert list(ours.rope_layers) == [bool(f) for f in ref.no_rope_layers], cfg
        windows = [ours.sliding_window if t == "sliding_attention" else None for t in ours.layer_types]
        expected = [
            ref.sliding_window if ref.use_sliding_window and t == "sliding_attention" else None
            for t in ref.layer_types
        ]
        assert (windows or [None] * ours.num_layers) == expected, cfg
    bare = _set(  # 32 heads of 16 (a multiple of SmolLM3Config's default 4 KV heads)
        "smollm3",
        drop=("num_key_value_heads", "max_position_embeddings", "rope_parameters", "tie_word_embeddings"),
        num_attention_heads=32,
        hidden_size=512,
    )
    ours, ref = _read(bare), theirs(bare)
    assert (ours.num_kv_heads, ours.max_position_embeddings, ours.rope_theta, ours.tie_word_embeddings) == (
        ref.num_key_value_heads,
        ref.max_position_embeddings,
        ref.rope_parameters["rope_theta"],
        ref.tie_word_embeddings,
    )


def test_olmo3_windows_and_ropes_by_layer_type_read_as_transformers() -> None:
    """OLMo 3's layer types (three sliding, then one full, or as given), each type's rope from
    rope_parameters (500,000 where left out), and the older top-level form, where transformers' Olmo3Config
    gives rope_theta and rope_scaling to the full layers only; q/k norms across heads (tensor parallel refused)."""
    from transformers import Olmo3Config

    def theirs(cfg: dict[str, Any]) -> Any:
        return _theirs(Olmo3Config, cfg)

    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    for cfg in (
        _set("olmo3"),
        _set("olmo3", num_hidden_layers=8, drop=("layer_types",)),
        _set("olmo3", drop=("rope_parameters",)),
        _set("olmo3", drop=("rope_parameters",), rope_theta=12_345.0, rope_scaling=yarn),
    ):
        ours, ref = _read(cfg), theirs(cfg)
        assert list(ours.layer_types) == ref.layer_types and ours.sliding_window == ref.sliding_window, cfg
        for i, kind in enumerate(ref.layer_types):
            theta, scaling = ours.layer_rope(i)
            want = ref.rope_parameters[kind]
            assert theta == want["rope_theta"], (cfg, i)
            assert (scaling or {}).get("rope_type", "default") == want["rope_type"], (cfg, i)
        assert ours.qk_norm_across_heads is True


def test_ministral_windows_and_seed_oss_biases_read_as_transformers() -> None:
    """Ministral's windows by layer_types (every layer sliding when none are given and a window is set;
    none without a window) and Seed-OSS's three bias flags (attention_bias on q/k/v, attention_out_bias on
    o_proj, mlp_bias), with each config class's defaults for the keys a config may omit."""
    from transformers import MinistralConfig, SeedOssConfig

    for cfg in (
        _set("ministral"),
        _set("ministral", drop=("layer_types",)),
        _set("ministral", drop=("layer_types", "sliding_window")),
        _set("ministral", drop=("layer_types",), sliding_window=None),
    ):
        ours = _read(cfg)
        ref = _theirs(MinistralConfig, cfg)
        windows = [ours.sliding_window if t == "sliding_attention" else None for t in ours.layer_types]
        expected = [ref.sliding_window if t == "sliding_attention" else None for t in ref.layer_types]
        assert (windows or [None] * ours.num_layers) == expected, cfg
    ours = _read(_cfg("seed_oss"))
    assert (ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias) == (True, True, True)
    bare = _set(  # 32 heads (a multiple of SeedOssConfig's default 8 KV heads)
        "seed_oss",
        drop=("attention_bias", "attention_out_bias", "mlp_bias", "num_key_value_heads", "head_dim"),
        num_attention_heads=32,
    )
    ours = _read(bare)
    ref = _theirs(SeedOssConfig, bare)
    assert (ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias) == (
        ref.attention_bias,
        ref.attention_out_bias,
        ref.mlp_bias,
    )
    assert (ours.num_kv_heads, ours.head_dim) == (ref.num_key_value_heads, ref.head_dim)


@pytest.mark.parametrize("family", ["glm", "glm4"])
def test_glm_defaults_read_as_transformers(family: str) -> None:
    """A GLM config.json that leaves out what GlmConfig / Glm4Config fill in (half of each head rotating,
    q/k/v biases, 2 KV heads of 128 dims, rms_norm_eps 1.5625e-7, three EOS ids) is read as those classes
    read it, and its rope always turns interleaved pairs."""
    from transformers import Glm4Config, GlmConfig

    config_class = GlmConfig if family == "glm" else Glm4Config
    bare = _set(
        family,
        drop=(
            "head_dim",
            "num_key_value_heads",
            "rms_norm_eps",
            "attention_bias",
            "eos_token_id",
            "rope_parameters",
        ),
        num_attention_heads=4,
        hidden_size=512,
    )
    ours = _read(bare)
    ref = _theirs(config_class, bare)
    assert (ours.head_dim, ours.num_kv_heads, ours.rms_norm_eps) == (
        ref.head_dim,
        ref.num_key_value_heads,
        ref.rms_norm_eps,
    )
    assert ours.rotary_dim == int(ref.head_dim * ref.rope_parameters["partial_rotary_factor"]) == 64
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert (ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias) == (ref.attention_bias, False, False)
    assert ours.eos_token_ids == ref.eos_token_id
    assert ours.rope_interleaved and not _read(_cfg("llama_dynamic")).rope_interleaved
    with pytest.raises(
        ValueError, match=r"partial_rotary_factor 0.35 in /m gives rotary_dim 5 for head_dim 16"
    ):
        _read(_set(family, partial_rotary_factor=0.35))  # an odd rotary_dim: pairs cannot be formed


@pytest.mark.parametrize("family", ["cohere", "cohere2"])
def test_cohere_defaults_read_as_transformers(family: str) -> None:
    """A Cohere config.json that leaves out logit_scale, layer_norm_eps, tie_word_embeddings,
    num_key_value_heads and (Command R7B) layer_types is read as CohereConfig / Cohere2Config read it:
    0.0625, 1e-5, tied, multi-head, three sliding layers then a full one, rope on the sliding layers only."""
    from transformers import Cohere2Config, CohereConfig

    config_class = CohereConfig if family == "cohere" else Cohere2Config
    drop = ("logit_scale", "layer_norm_eps", "tie_word_embeddings", "num_key_value_heads", "layer_types")
    bare = _set(family, drop=drop, num_hidden_layers=8)
    ours = _read(bare)
    ref = _theirs(config_class, bare)
    assert (ours.logit_scale, ours.layer_norm_eps, ours.tie_word_embeddings) == (
        ref.logit_scale,
        ref.layer_norm_eps,
        ref.tie_word_embeddings,
    )
    assert ours.num_kv_heads == ref.num_key_value_heads == ref.num_attention_heads
    assert ours.rope_interleaved
    if family == "cohere2":
        assert list(ours.layer_types) == ref.layer_types
        assert [ours.layer_has_rope(i) for i in range(8)] == [
            t == "sliding_attention" for t in ref.layer_types
        ]
        assert [ours.layer_has_rope(i) for i in range(8)] == [True, True, True, False] * 2
    else:
        assert not ours.layer_types and all(ours.layer_has_rope(i) for i in range(8))
    with pytest.raises(ValueError, match=r"logit_scale in /m/config.json must be a positive number; got 0"):
        _read(_set(family, logit_scale=0))


@pytest.mark.parametrize("family", ["helium", "ernie4_5"])
def test_helium_and_ernie_defaults_read_as_transformers(family: str) -> None:
    """Helium's and ERNIE 4.5's configs without the keys their classes fill in (rope_theta 100,000 /
    500,000, KV heads, head_dim, rms_norm_eps, ERNIE's tied embeddings) read as HeliumConfig /
    Ernie4_5Config read them; their biases by their own flags; their rope turns interleaved pairs."""
    from transformers import Ernie4_5Config, HeliumConfig

    config_class = HeliumConfig if family == "helium" else Ernie4_5Config
    drop = ("num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings")
    heads = 20 if family == "helium" else 4  # a multiple of the default KV heads (Helium's 20, ERNIE's 2)
    bare = _set(family, drop=drop, num_attention_heads=heads, hidden_size=128 * heads)
    ours = _read(bare)
    ref = _theirs(config_class, bare)
    assert (ours.num_kv_heads, ours.head_dim, ours.rms_norm_eps, ours.tie_word_embeddings) == (
        ref.num_key_value_heads,
        ref.head_dim,
        ref.rms_norm_eps,
        ref.tie_word_embeddings,
    )
    assert (
        ours.rope_theta
        == ref.rope_parameters["rope_theta"]
        == (100_000.0 if family == "helium" else 500_000.0)
    )
    assert ours.rope_interleaved and ours.rotary_dim == ours.head_dim
    if family == "helium":
        assert (ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias) == (True, False, True)
    else:
        assert (ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias) == (True, True, True)
        assert _read(_set(family, use_bias=False)).qkv_bias is False


def test_exaone4_windows_and_rope_read_as_transformers() -> None:
    """EXAONE 4.0's layer types by sliding_window_pattern (three sliding layers, then a full one) when a
    config gives none, its window's default (4096) when the key is left out, rope only on the sliding layers
    when there is a window and on every layer without one, and per-head q/k norms."""
    from transformers import Exaone4Config

    bare = _set("exaone4", drop=("layer_types", "sliding_window"), num_hidden_layers=8)
    ours = _read(bare)
    ref = _theirs(Exaone4Config, bare)
    assert (ours.sliding_window, list(ours.layer_types)) == (ref.sliding_window, ref.layer_types)
    assert [ours.layer_has_rope(i) for i in range(8)] == [True, True, True, False] * 2
    assert ours.num_kv_heads == ref.num_key_value_heads
    assert ours.qk_norm and not ours.qk_norm_across_heads
    unwindowed = _read(_set("exaone4", drop=("layer_types",), sliding_window=None, num_hidden_layers=4))
    assert unwindowed.sliding_window is None and all(unwindowed.layer_has_rope(i) for i in range(4))


def test_arcee_activation_and_defaults_read_as_transformers() -> None:
    """Arcee's ReLU² MLP (`hidden_act` relu2 by default; another activation refused naming it), its biases by
    attention_bias (q/k/v and o_proj, as Llama's) and mlp_bias, and ArceeConfig's defaults."""
    from transformers import ArceeConfig

    bare = _set("arcee", drop=("hidden_act", "rms_norm_eps", "max_position_embeddings"))
    ours = _read(bare)
    ref = _theirs(ArceeConfig, bare)
    assert (ours.hidden_act, ours.rms_norm_eps, ours.max_position_embeddings) == (
        ref.hidden_act,
        ref.rms_norm_eps,
        ref.max_position_embeddings,
    )
    assert (ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias) == (True, True, True)
    with pytest.raises(ValueError, match=r"unsupported hidden_act 'silu' in /m; only 'relu2' is supported"):
        _read(_set("arcee", hidden_act="silu"))


def test_apertus_defaults_read_as_transformers() -> None:
    """Apertus without rope keys takes ApertusConfig's llama3-scaled rope (theta 1.2e7, factor 8 over 8,192);
    its xIELU MLP (`hidden_act` xielu, another refused), per-head q/k norms and the class's other defaults."""
    from transformers import ApertusConfig

    bare = _set("apertus", drop=("rope_parameters", "hidden_act", "rms_norm_eps", "max_position_embeddings"))
    ours = _read(bare)
    ref = _theirs(ApertusConfig, bare)
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] == 12_000_000.0
    assert ours.rope_scaling is not None
    for key in (
        "rope_type",
        "factor",
        "original_max_position_embeddings",
        "low_freq_factor",
        "high_freq_factor",
    ):
        assert ours.rope_scaling[key] == ref.rope_parameters[key], key
    assert (ours.hidden_act, ours.rms_norm_eps, ours.max_position_embeddings) == (
        ref.hidden_act,
        ref.rms_norm_eps,
        ref.max_position_embeddings,
    )
    assert ours.qk_norm and (ours.qkv_bias, ours.o_proj_bias, ours.mlp_bias) == (True, True, False)
    with pytest.raises(ValueError, match=r"unsupported hidden_act 'silu' in /m; only 'xielu' is supported"):
        _read(_set("apertus", hidden_act="silu"))


def test_granite4_read_as_transformers() -> None:
    """Granite 4.0 (`GraniteMoeHybridForCausalLM`) with attention layers only: GraniteMoeHybridConfig's
    defaults for the experts (8, top 2) and the shared MLP (1,024); 0 experts is a dense model whose MLP is the
    shared one; no rope unless position_embedding_type is "rope"; a config without layer types (Mamba layers
    by transformers' default) or with Mamba layers is refused naming the field."""
    from transformers import GraniteMoeHybridConfig

    bare = _set("granite4_moe", drop=("num_local_experts", "shared_intermediate_size"))
    ours = _read(bare)
    # (its saved time_step_limit, a Mamba setting with an infinite bound, does not read back through the class)
    ref = _theirs(GraniteMoeHybridConfig, bare, drop=("time_step_limit",))
    assert (ours.num_experts, ours.num_experts_per_tok, ours.shared_expert_intermediate_size) == (
        ref.num_local_experts,
        ref.num_experts_per_tok,
        ref.shared_intermediate_size,
    )
    assert ours.softmax_after_topk and all(ours.layer_has_rope(i) for i in range(ours.num_layers))
    dense = _read(_cfg("granite4_dense"))
    assert not dense.is_moe and dense.intermediate_size == 40  # the shared MLP's size, not intermediate_size
    assert not any(dense.layer_has_rope(i) for i in range(dense.num_layers))
    assert dense.embedding_multiplier == 12.0 and dense.attention_multiplier == 0.09
    with pytest.raises(ValueError, match=r"unsupported layers_block_type None in /m/config.json"):
        _read(_set("granite4_dense", drop=("layer_types",)))
    with pytest.raises(ValueError, match=r"unsupported position_embedding_type 'alibi'"):
        _read(_set("granite4_dense", position_embedding_type="alibi"))


def test_olmoe_read_as_transformers() -> None:
    """OLMoE (`OlmoeForCausalLM`): OlmoeConfig's defaults for the experts (64, top 8, no renormalisation),
    clip_qkv (none) and the end-of-text id; every layer MoE of intermediate_size; q/k norms over all heads;
    tensor parallelism refused at start naming the norms."""
    from transformers import OlmoeConfig

    bare = _set(
        "olmoe", drop=("num_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv", "eos_token_id")
    )
    ours, ref = _read(bare), _theirs(OlmoeConfig, bare)
    assert (ours.num_experts, ours.num_experts_per_tok, ours.norm_topk_prob, ours.clip_qkv) == (
        ref.num_experts,
        ref.num_experts_per_tok,
        ref.norm_topk_prob,
        ref.clip_qkv,
    )
    assert ours.eos_token_ids == [ref.eos_token_id]
    tiny = _read(_cfg("olmoe"))
    assert (tiny.num_experts, tiny.num_experts_per_tok, tiny.moe_intermediate_size, tiny.clip_qkv) == (
        4,
        2,
        48,
        1.5,
    )
    assert tiny.moe_layers == (0, 1) and tiny.qk_norm_across_heads and not tiny.qk_norm
    assert tiny.routing_weights_in_model_dtype and not tiny.norm_topk_prob
    with pytest.raises(ValueError, match=r"clip_qkv must be a positive number or null; got -1 in /m"):
        _read(_set("olmoe", clip_qkv=-1))
    with pytest.raises(
        ValueError, match=r"norm_topk_prob in /m/config.json must be true or false; got 'yes'"
    ):
        _read(_set("olmoe", norm_topk_prob="yes"))


def test_gpt2_read_as_transformers() -> None:
    """GPT-2's own config names (n_embd, n_layer, n_head, n_positions, n_inner, layer_norm_epsilon,
    activation_function) read as GPT2Config reads them, each left out at its default; no rope on any layer,
    tied embeddings, biases everywhere; wrong values refused naming GPT-2's field."""
    from transformers import GPT2Config

    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    ours, ref = _read(cfg), GPT2Config()
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        ref.n_embd,
        ref.n_layer,
        ref.n_head,
        ref.n_head,
        ref.n_embd // ref.n_head,
    )
    assert (ours.max_position_embeddings, ours.intermediate_size, ours.vocab_size) == (
        ref.n_positions,
        4 * ref.n_embd,
        ref.vocab_size,
    )
    assert (ours.layer_norm_eps, ours.hidden_act, ours.eos_token_ids) == (
        ref.layer_norm_epsilon,
        ref.activation_function,
        [ref.eos_token_id],
    )
    assert ours.tie_word_embeddings and ours.qkv_bias and ours.o_proj_bias and ours.mlp_bias
    assert not any(ours.layer_has_rope(i) for i in range(ours.num_layers))
    assert ours.attention_multiplier is None  # head_dim ** -0.5
    tiny = _read(_cfg("gpt2"))
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.max_position_embeddings) == (64, 128, 256)
    assert _read({**cfg, "scale_attn_weights": False}).attention_multiplier == 1.0
    with pytest.raises(ValueError, match=r"n_inner in /m/config.json must be a positive integer; got 0"):
        _read({**cfg, "n_inner": 0})
    with pytest.raises(ValueError, match=r"n_head in /m/config.json must be a positive integer; got '12'"):
        _read({**cfg, "n_head": "12"})
    with pytest.raises(ValueError, match=r"layer_norm_epsilon in /m/config.json must be a positive number"):
        _read({**cfg, "layer_norm_epsilon": -1})


def test_gptj_read_as_transformers() -> None:
    """GPT-J: GPT-2's config names with GPTJConfig's defaults, `rotary_dim` of the head (null: all of it)
    rotating interleaved pairs, no q/k/v or out_proj bias, an untied head with a bias."""
    from transformers import GPTJConfig

    cfg = {"architectures": ["GPTJForCausalLM"], "model_type": "gptj"}
    ours, ref = _read(cfg), GPTJConfig()
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.max_position_embeddings) == (
        ref.n_embd,
        ref.n_layer,
        ref.n_head,
        ref.n_positions,
    )
    assert (ours.rotary_dim, ours.vocab_size, ours.intermediate_size, ours.layer_norm_eps) == (
        ref.rotary_dim,
        ref.vocab_size,
        4 * ref.n_embd,
        ref.layer_norm_epsilon,
    )
    assert ours.rope_interleaved and ours.lm_head_bias and not ours.tie_word_embeddings
    assert not (ours.qkv_bias or ours.o_proj_bias)
    assert _read({**cfg, "rotary_dim": None}).rotary_dim == ours.head_dim
    with pytest.raises(
        ValueError, match=r"rotary_dim 300 in /m/config.json must be even and at most head_dim 256"
    ):
        _read({**cfg, "rotary_dim": 300})
    with pytest.raises(ValueError, match=r"rotary_dim in /m/config.json must be a positive integer; got 0"):
        _read({**cfg, "rotary_dim": 0})


def test_opt_read_as_transformers() -> None:
    """OPT: OPTConfig's defaults (ffn_dim as the MLP's width, ReLU, biases by enable_bias, a tied head, no
    rope on any layer)."""
    from transformers import OPTConfig

    cfg = {"architectures": ["OPTForCausalLM"], "model_type": "opt"}
    ours, ref = _read(cfg), OPTConfig()
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.intermediate_size) == (
        ref.hidden_size,
        ref.num_hidden_layers,
        ref.num_attention_heads,
        ref.ffn_dim,
    )
    assert (ours.max_position_embeddings, ours.vocab_size, ours.hidden_act, ours.eos_token_ids) == (
        ref.max_position_embeddings,
        ref.vocab_size,
        ref.activation_function,
        [ref.eos_token_id],
    )
    assert ours.tie_word_embeddings and ours.qkv_bias and ours.o_proj_bias and ours.mlp_bias
    assert not any(ours.layer_has_rope(i) for i in range(ours.num_layers))
    unbiased = _read({**cfg, "enable_bias": False})
    assert not (unbiased.qkv_bias or unbiased.o_proj_bias or unbiased.mlp_bias)
    with pytest.raises(ValueError, match=r"ffn_dim in /m/config.json must be a positive integer; got 0"):
        _read({**cfg, "ffn_dim": 0})
    with pytest.raises(ValueError, match=r"enable_bias in /m/config.json must be true or false; got 'yes'"):
        _read({**cfg, "enable_bias": "yes"})


def test_gpt_bigcode_read_as_transformers() -> None:
    """GPTBigCode (StarCoder): GPTBigCodeConfig's defaults under GPT-2's names, one K/V head (multi_query,
    default true), GELU's tanh form, a tied head, no rope."""
    from transformers import GPTBigCodeConfig

    cfg = {"architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode"}
    ours, ref = _read(cfg), GPTBigCodeConfig()
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads) == (
        ref.n_embd,
        ref.n_layer,
        ref.n_head,
        1,
    )
    assert (ours.max_position_embeddings, ours.intermediate_size, ours.hidden_act, ours.layer_norm_eps) == (
        ref.n_positions,
        4 * ref.n_embd,
        ref.activation_function,
        ref.layer_norm_epsilon,
    )
    assert ours.tie_word_embeddings and ours.qkv_bias and ours.mlp_bias
    assert not any(ours.layer_has_rope(i) for i in range(ours.num_layers))
