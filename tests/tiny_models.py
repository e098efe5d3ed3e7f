"""Tiny Hugging Face checkpoints built offline for tests: a byte-level BPE tokenizer trained with
`tokenizers` on Python standard-library docstrings, and random-weight models of every supported family
saved with `save_pretrained`. Deterministic for a given seed. No downloads.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB_SIZE = 500
MODEL_VOCAB_SIZE = 512  # a little padding past the tokenizer, as real checkpoints often have


def stdlib_corpus(max_chars: int = 400_000) -> list[str]:
    """Docstrings of a fixed list of standard-library modules: offline English text."""
    import argparse
    import collections
    import functools
    import json as json_mod
    import pathlib
    import string
    import textwrap

    texts: list[str] = [
        "Hello world. The quick brown fox jumps over the lazy dog. Caf\u00e9 na\u00efve \u00fcber \u2014 \u2603 \u4f60\u597d.",
    ]
    for mod in (collections, functools, json_mod, pathlib, string, textwrap, argparse):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    out, total = [], 0
    for t in texts:
        out.append(t)
        total += len(t)
        if total > max_chars:
            break
    return out


def build_tokenizer(path: Path) -> Path:
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return path


FAMILIES = (
    "llama",
    "llama3_scaled",
    "llama_tied",
    "mistral",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "phi3",
    "phi3_partial",
    "mistral_window",
    "gemma2",
    "gemma3",
    "granite",
    "granite_moe",
    "granite_moe_shared",
    "granite4_moe",
    "granite4_dense",
    "olmo2",
    "olmo",
    "stablelm",
    "starcoder2",
    "phi",
    "gpt_neox",
    "smollm3",
    "olmo3",
    "ministral",
    "seed_oss",
    "glm",
    "glm4",
    "cohere",
    "cohere2",
    "helium",
    "ernie4_5",
    "exaone4",
    "arcee",
    "apertus",
    "olmoe",
    "gpt2",
    "gptj",
    "opt",
    "gpt_bigcode",
    "qwen2_yarn",
    "llama_dynamic",
)
MOE_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "granite_moe",
    "granite_moe_shared",
    "granite4_moe",
    "olmoe",
)
# Tiny mixture-of-experts settings: 4 experts, top-2, an expert intermediate size that is no power of two.
_MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.0)


def longrope_parameters(rotary_dim: int, original_max_position_embeddings: int, **extra: float) -> dict:
    """A longrope `rope_parameters` dict with distinct, deterministic short and long factors."""
    half = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.05 * i for i in range(half)],
        "long_factor": [1.5 + 0.75 * i for i in range(half)],
        "original_max_position_embeddings": original_max_position_embeddings,
        **extra,
    }


def preemption_cache(family: str) -> dict:
    """LLM cache options that force preemption on the parity prompts (the longest 40 + 20 tokens: 8 blocks
    of 8; the batch ~20): 9 blocks. A model windowed alike on every layer holds only its window's blocks
    (2 or 3 of 8 for a decode: tests/e2e/test_sliding_window_blocks.py), so 6, with prompts in chunks of
    16 so each fits alone (tests/e2e/test_parity.py, loadtest/gpu_engine_check.py). No admission
    reserve: admission keeps none, so running requests grow by preempting (the path under test)."""
    if family in ("mistral_window", "starcoder2"):
        return dict(block_size=8, num_kv_blocks=6, max_num_batched_tokens=16, admission_reserve_tokens=0)
    return dict(block_size=8, num_kv_blocks=9, admission_reserve_tokens=0)


# Windows shorter than the parity tests' prompts + outputs (5-48 + 20 tokens), so they matter: under a
# 16-token block, across 8-token blocks, and of one 8-token block.
WINDOWS = {
    "mistral_window": 10,
    "gemma2": 12,
    "gemma3": 8,
    "qwen2_window": 10,
    "qwen2_moe_window": 9,
    "phi3_window": 11,
    "starcoder2": 12,
    "olmo3": 10,
    "ministral": 11,
    "cohere2": 10,
    "exaone4": 9,
}
# Rope scalings with lengths the parity tests' prompts + outputs (up to 68 tokens) cross or stay under:
# yarn's pretraining length (its scaling is static, so it changes every position's rotation, its ramp
# over the 8 frequencies of a 16-dim head partial at this length) and dynamic's max_position_embeddings
# (weir's default max_model_len: transformers applies no scaling below it, and weir none).
YARN_ORIGINAL = 32
DYNAMIC_MAX_POSITIONS = 72
# Built on demand by their own tests (tests/e2e/test_parity.py), not by every FAMILIES-wide test.
OTHER_FAMILIES = ("gemma", "qwen2_window", "qwen2_moe_window", "phi3_window")


def make_config(family: str, vocab_size: int = MODEL_VOCAB_SIZE, **sizes: int):
    """A tiny transformers config of the given family (random weights are drawn later)."""
    from transformers import (
        ApertusConfig,
        ArceeConfig,
        Cohere2Config,
        CohereConfig,
        Ernie4_5Config,
        Exaone4Config,
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        Glm4Config,
        GlmConfig,
        GPT2Config,
        GPTBigCodeConfig,
        GPTJConfig,
        GPTNeoXConfig,
        GraniteConfig,
        GraniteMoeConfig,
        GraniteMoeHybridConfig,
        GraniteMoeSharedConfig,
        HeliumConfig,
        LlamaConfig,
        MinistralConfig,
        MistralConfig,
        MixtralConfig,
        Olmo2Config,
        Olmo3Config,
        OlmoConfig,
        OlmoeConfig,
        OPTConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
        SeedOssConfig,
        SmolLM3Config,
        StableLmConfig,
        Starcoder2Config,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(sizes)  # e.g. hidden_size / intermediate_size for a wider model
    if family == "llama":
        return LlamaConfig(**common)
    if family == "llama3_scaled":
        return LlamaConfig(
            **common,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "qwen2_yarn":  # Qwen2.5 / Qwen3's long-context setting, in the legacy rope_scaling form
        rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": YARN_ORIGINAL}
        return Qwen2Config(**common, rope_scaling=rope)
    if family == "llama_dynamic":
        positions = {"max_position_embeddings": DYNAMIC_MAX_POSITIONS}
        return LlamaConfig(**{**common, **positions}, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    if family == "llama_tied":
        return LlamaConfig(**{**common, "tie_word_embeddings": True})
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**{**common, "head_dim": 32, "tie_word_embeddings": True})
    if family == "phi3":  # Phi-3-mini / Phi-4: fused qkv_proj and gate_up_proj, plain rope
        return Phi3Config(**common, pad_token_id=0)
    if family == "phi3_partial":
        # Phi-4-mini's shape: 3/4 of each head rotates (head_dim 16 -> 12, a half of 6 that is not a
        # power of two), longrope. original_max_position_embeddings equals max_position_embeddings, so
        # both weir and transformers use the short factors at every length; an explicit attention
        # factor still scales cos/sin. tests/engine/test_phi3.py crosses to the long factors.
        rotary_dim = 12
        rope = longrope_parameters(
            rotary_dim,
            common["max_position_embeddings"],
            factor=1.0,
            attention_factor=1.19,
            partial_rotary_factor=0.75,
        )
        return Phi3Config(
            **common,
            pad_token_id=0,
            original_max_position_embeddings=common["max_position_embeddings"],
            rope_parameters=rope,
        )
    if family == "mixtral":  # every layer MoE; intermediate_size is each expert's
        return MixtralConfig(
            **{**common, "intermediate_size": 48}, num_local_experts=4, sliding_window=None, **_MOE
        )
    if family == "qwen2_moe":  # every layer MoE, plus the sigmoid-gated shared expert; no renormalisation
        return Qwen2MoeConfig(
            **common,
            num_experts=4,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=64,
            norm_topk_prob=False,
            **_MOE,
        )
    if family == "qwen3_moe":  # layer 0 dense (mlp_only_layers), layer 1 MoE; q/k norm; renormalised top-k
        return Qwen3MoeConfig(
            **{**common, "head_dim": 32},
            num_experts=4,
            moe_intermediate_size=48,
            mlp_only_layers=[0],
            norm_topk_prob=True,
            **_MOE,
        )
    if family == "mistral_window":
        return MistralConfig(**common, sliding_window=WINDOWS[family])
    if family == "qwen2_window":  # full, sliding, sliding
        return Qwen2Config(
            **{**common, "num_hidden_layers": 3},
            use_sliding_window=True,
            sliding_window=WINDOWS[family],
            max_window_layers=1,
        )
    if family == "qwen2_moe_window":  # transformers' Qwen2-MoE layout: sliding, full, full (layer 2 >= 2)
        return Qwen2MoeConfig(
            **{**common, "num_hidden_layers": 3},
            num_experts=4,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=64,
            use_sliding_window=True,
            sliding_window=WINDOWS[family],
            max_window_layers=2,
            **_MOE,
        )
    if family == "phi3_window":  # Phi-3-mini-4k's kind: the window on every layer
        return Phi3Config(**common, pad_token_id=0, sliding_window=WINDOWS[family])
    # Granite 3's scalings, far enough from 1 (and the attention multiplier from head_dim ** -0.5 = 0.25)
    # that leaving any one out changes the tokens
    granite = dict(
        embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0, attention_multiplier=0.09
    )
    if family == "granite":  # biases on every projection
        return GraniteConfig(**common, **granite, attention_bias=True, mlp_bias=True)
    if family == "granite_moe":  # every layer MoE (4 experts of 48, top-2), stacked expert tensors
        return GraniteMoeConfig(**{**common, "intermediate_size": 48}, **granite, num_local_experts=4, **_MOE)
    if family == "granite_moe_shared":  # the same, plus an ungated shared MLP of 40 beside the experts
        return GraniteMoeSharedConfig(
            **{**common, "intermediate_size": 48},
            **granite,
            num_local_experts=4,
            shared_intermediate_size=40,
            **_MOE,
        )
    if family in ("granite4_moe", "granite4_dense"):  # Granite 4.0's layout with attention layers only
        experts = dict(num_local_experts=4, **_MOE) if family == "granite4_moe" else dict(num_local_experts=0)
        return (
            GraniteMoeHybridConfig(  # the MoE one with rope; the dense one (its MLP the shared one) without
                **{**common, "intermediate_size": 48},
                **granite,
                **experts,
                shared_intermediate_size=40,
                layer_types=["attention"] * common["num_hidden_layers"],
                position_embedding_type="rope" if family == "granite4_moe" else None,
                attention_bias=family == "granite4_dense",
            )
        )
    if family == "stablelm":  # LayerNorms with weight and bias, a quarter of each head rotates, q/k/v biases
        base = {k: v for k, v in common.items() if k != "rms_norm_eps"}
        return StableLmConfig(**base, use_qkv_bias=True, partial_rotary_factor=0.25, pad_token_id=0)
    if family == "starcoder2":  # plain GELU MLP, biases everywhere, LayerNorms, every layer windowed, tied
        base = {k: v for k, v in common.items() if k not in ("rms_norm_eps", "tie_word_embeddings")}
        return Starcoder2Config(**base, use_bias=True, sliding_window=WINDOWS[family], pad_token_id=0)
    if (
        family == "phi"
    ):  # Phi-2's kind: parallel block, fc1/fc2 GELU MLP, 0.4 of each head rotates, LM head bias
        base = {k: v for k, v in common.items() if k != "rms_norm_eps"}
        return PhiConfig(**base, partial_rotary_factor=0.4, pad_token_id=0)
    if (
        family == "gpt_neox"
    ):  # Pythia's kind: per-head fused q/k/v, a quarter of each head rotates, parallel residual
        base = {k: v for k, v in common.items() if k not in ("rms_norm_eps", "num_key_value_heads")}
        return GPTNeoXConfig(**base, rotary_pct=0.25, use_parallel_residual=True, pad_token_id=0)
    if family == "ministral":  # a window on the first layer of two (its layer_types), none on the second
        layer_types = ["sliding_attention", "full_attention"]
        return MinistralConfig(  # (transformers' Ministral needs head_dim set: it reads None as is)
            **{**common, "head_dim": 16},
            sliding_window=WINDOWS[family],
            layer_types=layer_types,
            pad_token_id=0,
        )
    if family == "cohere":  # a parallel block on one bias-free LayerNorm, interleaved rope, logits scaled
        base = {k: v for k, v in common.items() if k not in ("rms_norm_eps", "tie_word_embeddings")}
        return CohereConfig(**base, logit_scale=0.5, pad_token_id=0)
    if family == "cohere2":  # the same with a window on the first layer of two; the second has no rope
        base = {k: v for k, v in common.items() if k not in ("rms_norm_eps", "tie_word_embeddings")}
        layer_types = ["sliding_attention", "full_attention"]
        return Cohere2Config(**base, sliding_window=WINDOWS[family], layer_types=layer_types, pad_token_id=0)
    if family == "apertus":  # an ungated xIELU MLP (its scalars drawn at random too), per-head q/k norms
        return ApertusConfig(**common, attention_bias=True, pad_token_id=0)
    if family == "arcee":  # an ungated ReLU² MLP (up_proj -> down_proj) with biases; attention biases too
        return ArceeConfig(**common, mlp_bias=True, attention_bias=True, pad_token_id=0)
    if (
        family == "exaone4"
    ):  # post-norms, per-head q/k norms; a window on layer 0, no rope on the full layer 1
        layer_types = ["sliding_attention", "full_attention"]
        return Exaone4Config(
            **common, sliding_window=WINDOWS[family], layer_types=layer_types, pad_token_id=0
        )
    if family == "helium":  # interleaved rope over the whole head; q/k/v and MLP biases by their flags
        return HeliumConfig(**{**common, "head_dim": 16}, attention_bias=True, mlp_bias=True, pad_token_id=0)
    if family == "ernie4_5":  # interleaved rope over the whole head; every projection's bias by use_bias
        return Ernie4_5Config(**{**common, "head_dim": 16}, use_bias=True, pad_token_id=0)
    if family in ("glm", "glm4"):  # half of each head rotates on interleaved pairs; q/k/v biases (defaults)
        glm_class = GlmConfig if family == "glm" else Glm4Config  # glm4: norms after attention and the MLP
        return glm_class(**{**common, "head_dim": 16}, pad_token_id=0)
    if family == "seed_oss":  # q/k/v, o_proj and MLP biases, each by its own flag
        return SeedOssConfig(
            **{**common, "head_dim": 16},
            attention_bias=True,
            attention_out_bias=True,
            mlp_bias=True,
            pad_token_id=0,
        )
    if (
        family == "smollm3"
    ):  # NoPE on every other layer here (the released model: every 4th), attention biases
        return SmolLM3Config(**common, no_rope_layer_interval=2, attention_bias=True, pad_token_id=0)
    if family == "olmo":  # OLMo 1: LayerNorms without weights; q/k/v clamped (a bound that bites here)
        return OlmoConfig(
            **{k: v for k, v in common.items() if k != "rms_norm_eps"}, clip_qkv=0.5, pad_token_id=0
        )
    if (
        family == "olmo3"
    ):  # OLMo 2's layers; sliding, sliding, sliding, full; the full layer's rope yarn-scaled
        rope = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "yarn", "rope_theta": 500_000.0, "factor": 2.0,
                               "original_max_position_embeddings": 128},
        }  # fmt: skip
        return Olmo3Config(
            **{**common, "num_hidden_layers": 4},
            sliding_window=WINDOWS[family],
            rope_parameters=rope,
            pad_token_id=0,
        )
    # GPT-2 and GPT-J: their own config names for the common sizes
    gpt2_sizes = dict(
        vocab_size=vocab_size,
        n_embd=common["hidden_size"],
        n_layer=common["num_hidden_layers"],
        n_head=common["num_attention_heads"],
        n_positions=common["max_position_embeddings"],
        n_inner=common["intermediate_size"],
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "gpt2":  # learned positions, Conv1D weights, LayerNorms, tied head
        return GPT2Config(**gpt2_sizes)
    if family == "gpt_bigcode":  # GPT-2's model with one K/V head and Linear weights (StarCoder)
        return GPTBigCodeConfig(**gpt2_sizes, multi_query=True)
    # GPT-J: a parallel block; half of each 16-dim head rotating on interleaved pairs; a head bias
    if family == "gptj":
        return GPTJConfig(**gpt2_sizes, rotary_dim=8)
    if family == "opt":  # GPT-2's decoder with Linear weights, positions offset by 2, ReLU
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=common["hidden_size"],
            num_hidden_layers=common["num_hidden_layers"],
            num_attention_heads=common["num_attention_heads"],
            ffn_dim=common["intermediate_size"],
            max_position_embeddings=common["max_position_embeddings"],
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    # OLMoE: every layer MoE; q/k norms over all heads, then q/k/v clamped (a bound that bites)
    if family == "olmoe":
        return OlmoeConfig(
            **{**common, "intermediate_size": 48}, num_experts=4, clip_qkv=1.5, pad_token_id=0, **_MOE
        )
    if family == "olmo2":  # post-norms, q/k norms over all heads
        return Olmo2Config(**common, pad_token_id=0)  # k_norm narrower than q_norm (2 of 4 kv heads)
    if family == "gemma":
        return GemmaConfig(**{**common, "head_dim": 16, "tie_word_embeddings": True})
    gemma = {**common, "head_dim": 16, "tie_word_embeddings": True, "query_pre_attn_scalar": 24}
    if family == "gemma2":
        # sliding, full, sliding; softcaps small enough to bend this model's scores and logits
        return Gemma2Config(
            **{**gemma, "num_hidden_layers": 3},
            sliding_window=WINDOWS[family],
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        )
    if family == "gemma3":
        # sliding, full, sliding: the global layer with linear rope scaling, the sliding ones on their own base
        return Gemma3TextConfig(
            **{**gemma, "num_hidden_layers": 3},
            sliding_window=WINDOWS[family],
            sliding_window_pattern=2,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        )
    raise ValueError(f"unknown family {family}")


# Families whose norm weights are drawn around 1 instead of left at 1 (a swapped or missing norm shows).
_NORMS_OFF_ONE = (
    "granite",
    "granite_moe",
    "granite_moe_shared",
    "granite4_moe",
    "granite4_dense",
    "olmo2",
    "olmo3",
    "olmoe",
    "gpt2",
    "gptj",
    "opt",
    "gpt_bigcode",
    "stablelm",
    "starcoder2",
    "phi",
    "gpt_neox",
    "smollm3",
)


def build_model(
    family: str,
    path: Path,
    tokenizer_dir: Path,
    seed: int = 0,
    vocab_size: int = MODEL_VOCAB_SIZE,
    config_overrides: dict | None = None,
    **sizes: int,
) -> Path:
    """Save a random-weight checkpoint of `family` (float32 safetensors) plus the tokenizer files;
    `sizes` override the config's dimensions (hidden_size, intermediate_size, ...), `config_overrides`
    any attribute the family sets itself (moe_intermediate_size, ...)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = make_config(family, vocab_size, **sizes)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default init so greedy decoding is not a flat distribution that ties easily.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
            elif "act_fn.alpha" in name:  # Apertus's xIELU scalars: each layer's own, as trained ones are
                p.normal_(0.0, 0.5)
            elif family.startswith("gemma") and "norm" in name:  # (1 + weight): 0 would hide a missing 1
                p.normal_(0.0, 0.3)
            elif family in _NORMS_OFF_ONE and "norm" in name:  # all-ones would hide a swapped norm
                p.normal_(1.0, 0.3)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(str(path))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def copy_with_config(src: Path, dst: Path, **config: Any) -> Path:
    """A copy of the checkpoint `src` at `dst` whose config.json has `config`'s keys set (None: null)."""
    import shutil

    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps({**read_config(dst), **config}))
    return dst


def hf_causal_lm(model_dir: str | Path, **kwargs: Any) -> Any:
    """transformers' model from `model_dir` as the parity reference (`kwargs` to from_pretrained): with
    eager attention where the config caps attention logits (Gemma 2). transformers 5.17 (the GPU
    image's) ran Gemma 2 through sdpa by default, which drops the cap, so the reference there differed
    from the model's definition (and from weir, and from transformers 5.25, which refuses sdpa for it):
    the engine check's tiny gemma2 left "transformers' tokens" at prompt 3, token 8, on an H100 at
    2d0586f and 9c4fe20, and the same 5.17 on the CPU gave the same drift (diagnose_divergence --layers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None) is not None:
        kwargs.setdefault("attn_implementation", "eager")
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
