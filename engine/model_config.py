"""What the engine needs to know about a checkpoint, read once from its config.json and
generation_config.json and validated here, so model code and the runner trust the values.

Handles both rope formats: transformers < 5 (`rope_theta` + `rope_scaling`) and transformers >= 5
(`rope_parameters` holding `rope_theta` and `rope_type`).

Sliding-window attention per layer (`layer_types`, transformers' names): Mistral's, Mixtral's and
Phi-3's window on every layer; Qwen2/Qwen3 with `use_sliding_window` on layers from `max_window_layers` on
(Qwen2-MoE: its even layers below it; Qwen3-MoE: every layer; or as `layer_types` says); Gemma 2
alternating (sliding first); Gemma 3 every `sliding_window_pattern`-th layer global (or as `layer_types`
says), its sliding layers with their own rope (`rope_local_base_freq`). The Gemma families'
other settings (GeGLU, query_pre_attn_scalar, logit softcaps) are read here too; values weir does not
implement are refused naming the field.

Phi-3 (`Phi3ForCausalLM`: Phi-3-mini/medium, Phi-3.5-mini, Phi-4, Phi-4-mini) adds two rope options:
`partial_rotary_factor` (only the first `rotary_dim` = int(head_dim * factor) dims of each head
rotate) and rope type `longrope` (Phi-3 "su", or "yarn" as transformers reads it): per-frequency
`short_factor` / `long_factor` and an attention factor that scales cos and sin. transformers switches from the short to the long factors
when a sequence grows past `original_max_position_embeddings` (recomputing its whole KV cache then);
weir, as vLLM, decides once per engine: the long factors when `max_model_len` (the user's value, else
max_position_embeddings) is larger than `original_max_position_embeddings`, else the short ones, so a KV
cache (and a prefix-cache block) never holds keys rotated two ways. Serve with `--max-model-len` at
most `original_max_position_embeddings` to get the short factors.

Rope types `yarn` (static: transformers' cache at every length; max_model_len up to, and by default,
original_max_position_embeddings * factor, as vLLM) and `dynamic` (Dynamic NTK: one base per engine,
from max_model_len) are validated and resolved in engine.rope_fields, whose doc says where dynamic's
tokens can differ from transformers'.

Granite (`GraniteForCausalLM`, and `GraniteMoeForCausalLM` over the MoE layers) is Llama with four
scalings (granite_fields): embedding_multiplier,
residual_multiplier, logits_scaling and attention_multiplier (the softmax scale). OLMo 2
(`Olmo2ForCausalLM`, engine.model.models.olmo2) norms each sub-layer's output instead of its input
and norms q and k over all heads at once (`qk_norm_across_heads`).

Plain Python: torch is imported only to resolve device/dtype "auto".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config_fields import (
    bool_field,
    config_file,
    int_field,
    positive_number,
    with_family_defaults,
)
from engine.model.models.registry import SUPPORTED_ARCHITECTURES
from engine.rope_fields import (
    default_max_model_len,
    resolve_dynamic,
    resolve_yarn,
    scaled_max_len,
    set_dynamic_seq_len,
)

logger = logging.getLogger("weir.engine")

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn", "dynamic")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
GEMMA_FAMILIES = ("Gemma", "Gemma2", "Gemma3")
_MULTIMODAL = {
    "Gemma3ForConditionalGeneration": "Gemma 3's multimodal (image + text) checkpoints are not supported; "
    "text-only Gemma 3 checkpoints (architecture Gemma3ForCausalLM, e.g. gemma-3-1b) are",
}
# generation_config.json key -> SamplingParams field, for the defaults a model ships with.
_GENERATION_DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


# Families with learned absolute position embeddings (engine.model.models.gpt2) and no rotary embedding:
# GPT-2, GPTBigCode (StarCoder) and OPT. Each has one bias setting for every projection and a tied head by
# default.
LEARNED_POSITION_FAMILIES = ("GPT2", "GPTBigCode", "OPT")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain rope; else has "rope_type" (linear, llama3, longrope, yarn, dynamic). longrope's is
    # resolved here: "attention_factor" (a float), "use_long_factor" (from max_model_len: see the module
    # doc); yarn's and dynamic's in engine.rope_fields (dynamic's "seq_len" from max_model_len).
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    # The user's value, else max_position_embeddings. What the model and the runner's memory profile
    # are sized for; requests may be held shorter by the KV cache's capacity (SchedulerConfig.max_model_len).
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (Qwen2; Llama/Qwen3 `attention_bias`)
    o_proj_bias: bool  # bias on the output projection (Llama/Qwen3 `attention_bias`; never Qwen2)
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm on q and k before rope (Qwen3, Gemma 3)
    sliding_window: int | None  # the window of the layers `layer_types` marks sliding; None: no window
    eos_token_ids: list[int]
    bos_token_id: int | None
    torch_dtype: str | None  # the checkpoint's dtype as config.json names it
    dtype: str  # resolved compute dtype: "float32" | "float16" | "bfloat16"
    device: str  # resolved: "cpu" | "cuda"
    # Sampling defaults from generation_config.json, keyed by SamplingParams field names.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # Leading dims of each head that rotate (Phi-3's partial_rotary_factor); 0 = all (head_dim).
    partial_rotary_dim: int = 0
    # The checkpoint rotates interleaved pairs of those dims (2i, 2i+1), GPT-J style (GLM), not the two
    # halves (i, i + rotary_dim / 2): q/k rows are reordered at load (engine.model.models.glm).
    rope_interleaved: bool = False
    # Cohere's logit_scale: the logits multiplied by it (1.0 elsewhere; Granite divides by logits_scaling).
    logit_scale: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return self.partial_rotary_dim or self.head_dim

    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; see moe_fields). 0 experts: a dense model.
    num_experts: int = 0  # routed experts of each MoE layer
    num_experts_per_tok: int = 0  # top_k
    moe_intermediate_size: int = 0  # each expert's intermediate size (dense layers: intermediate_size)
    norm_topk_prob: bool = False  # renormalise the top_k probabilities to sum to 1 (Mixtral: always)
    # Qwen casts the routing weights to the model dtype before weighting the experts; Mixtral keeps float32.
    routing_weights_in_model_dtype: bool = False
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is the MoE block (the others are dense)
    shared_expert_intermediate_size: int = 0  # a shared expert beside the routed ones (0: none)
    shared_expert_gated: bool = True  # Qwen2-MoE's is scaled by a sigmoid gate; GraniteMoeShared's is not
    # GraniteMoe: top_k of the router logits, then a softmax over those k (not over every expert)
    softmax_after_topk: bool = False

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # "silu"; "gelu_pytorch_tanh" (the Gemma families' GeGLU); StarCoder2, Phi and GPT-NeoX also "gelu_new"
    # and "gelu_fast" (the tanh form) and "gelu" (engine.model.models.ungated_mlp)
    hidden_act: str = "silu"
    # per layer: "full_attention" or "sliding_attention" (the window above); empty: every layer full
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: softmax scale this ** -0.5, not head_dim's
    attn_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2)
    # Gemma 3's sliding layers' own rope (rope_local_base_freq); None: every layer the one above
    rope_local_theta: float | None = None
    rope_local_scaling: dict[str, Any] | None = None
    # Granite's scalings (1.0 elsewhere): the embeddings times embedding_multiplier, each attention and
    # MLP output times residual_multiplier before its residual add, the logits divided by logits_scaling.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    attention_multiplier: float | None = None  # Granite's softmax scale; None: head_dim ** -0.5
    # OLMo 2: RMSNorm over the whole q and the whole k projection (every head at once), not per head
    qk_norm_across_heads: bool = False
    # OLMo 1: q, k and v projections clamped to [-clip_qkv, clip_qkv]; None: not clamped
    clip_qkv: float | None = None
    layer_norm_eps: float = 1e-5  # the LayerNorms (weight and bias) of StableLM, StarCoder2 and Phi
    lm_head_bias: bool = False  # Phi-1.5 / Phi-2's LM head has a bias
    parallel_residual: bool = False  # GPT-NeoX's use_parallel_residual: h + attn(ln1(h)) + mlp(ln2(h))
    # per layer: False where the layer has no rotary embedding (SmolLM3's NoPE layers); empty: all rotate
    rope_layers: tuple[bool, ...] = ()

    def layer_has_rope(self, layer_idx: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer_idx]

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer `layer_idx`, or None where it attends to its whole context (also
        where the window holds every position up to max_model_len: the kernels need no window then)."""
        if self.layer_types and self.layer_types[layer_idx] == SLIDING_ATTENTION:
            window = self.sliding_window
            return window if window is not None and window < self.max_model_len else None
        return None

    @property
    def uniform_sliding_window(self) -> int | None:
        """The window when every attention layer has it (Mistral, Mixtral, Phi-3, Qwen windowed on
        every layer): the KV cache manager then releases the blocks behind it. None when any layer
        reads its whole context (Gemma 2/3, Qwen's max_window_layers > 0), since one block table
        serves every layer, or when the window holds max_model_len anyway."""
        if not self.layer_types or any(t != SLIDING_ATTENTION for t in self.layer_types):
            return None
        return self.layer_window(0)

    def layer_rope(self, layer_idx: int) -> tuple[float, dict[str, Any] | None]:
        """(rope_theta, rope_scaling) of layer `layer_idx` (Gemma 3's sliding layers have their own). By the
        layer's type, not by `layer_window`: a window that covers max_model_len needs no masking (None
        there), but the layer keeps its own rope."""
        sliding = bool(self.layer_types) and self.layer_types[layer_idx] == SLIDING_ATTENTION
        if self.rope_local_theta is not None and sliding:
            return self.rope_local_theta, self.rope_local_scaling
        return self.rope_theta, self.rope_scaling

    @property
    def attention_bias(self) -> bool:
        return self.qkv_bias

    def quantized_weights_refusal(self, method: str) -> str | None:
        """Why this family's loaders cannot take linear weights quantized by `method` ("gptq", "awq",
        "fp8", ...), or None where they can. Each reason is a load-time rewrite of rows that only some
        weights survive; the MoE formats' own limits are the quant method's (`moe_refusal`)."""
        if self.softmax_after_topk:  # GraniteMoe, GraniteMoeShared
            return (
                "its experts load only from the float stacked tensors (input_linear / output_linear); "
                "serve an unquantized checkpoint"
            )
        if self.architecture == "GPTNeoXForCausalLM":
            return (
                "its fused query_key_value rows are reordered per head at load, which only float weights "
                "take; serve an unquantized checkpoint"
            )
        if self.architecture in ("OPTForCausalLM", "GPTBigCodeForCausalLM"):  # (not yet tested against weir)
            return f"weir serves float {self.architecture} checkpoints only; serve an unquantized checkpoint"
        if self.architecture == "GPT2LMHeadModel":
            return (
                "its Conv1D weights are stored [in, out] and transposed at load, which only float weights "
                "take; serve an unquantized checkpoint"
            )
        if self.rope_interleaved and method != "fp8":  # GLM, Cohere, Helium, ERNIE 4.5
            return (
                "its q/k rows are reordered at load for the rotary kernels (interleaved pairs to halves), "
                "which only float and FP8 weights (quant_method fp8, or --quantization fp8) take: packed "
                "integer rows would need it too; serve an unquantized or FP8 checkpoint"
            )
        return None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        max_model_len: int | None = None,
        dtype: str = "auto",
        device: str = "auto",
    ) -> ModelConfig:
        model_dir = Path(path)
        config_file = model_dir / "config.json"
        if not model_dir.is_dir():
            raise ValueError(f"model directory {str(model_dir)!r} does not exist")
        if not config_file.is_file():
            raise ValueError(f"no config.json in model directory {str(model_dir)!r}: expected {config_file}")
        try:
            cfg = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        gen_file = model_dir / "generation_config.json"
        gen: dict[str, Any] = {}
        if gen_file.is_file():
            try:
                gen = json.loads(gen_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{gen_file} is not valid JSON: {e}") from e
        return cls.from_dicts(
            str(model_dir), cfg, gen, max_model_len=max_model_len, dtype=dtype, device=device
        )

    @classmethod
    def from_dicts(
        cls,
        model_path: str,
        cfg: dict[str, Any],
        gen: dict[str, Any] | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        device: str = "auto",
    ) -> ModelConfig:
        gen = gen or {}
        architectures = cfg.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        multimodal = next((a for a in architectures if a in _MULTIMODAL), None)
        if arch is None and multimodal is not None:
            raise ValueError(
                f"unsupported model architecture {multimodal} in {model_path}: {_MULTIMODAL[multimodal]}"
            )
        if arch is None:
            named = ", ".join(architectures) if architectures else "none (config.json has no 'architectures')"
            raise ValueError(
                f"unsupported model architecture {named} in {model_path}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # (GPT-2's is the one architecture name without the ForCausalLM suffix)
        family = "GPT2" if arch == "GPT2LMHeadModel" else arch.removesuffix("ForCausalLM")
        gemma = family in GEMMA_FAMILIES
        cfg = with_family_defaults(family, cfg)
        if family == "GPTNeoX":
            cfg = _gpt_neox_rope_keys(cfg)
        gpt2: dict[str, Any] = {}
        if family in ("GPT2", "GPTJ", "GPTBigCode"):
            cfg, gpt2 = _gpt2_keys(cfg, model_path, arch)
        if family == "OPT":
            cfg = _opt_keys(cfg, model_path)
        if family == "Apertus":
            cfg = _apertus_default_rope(cfg)
        hidden_act = _hidden_act(family, cfg, model_path)

        hidden_size = int_field(cfg, "hidden_size", model_path)
        num_heads = int_field(cfg, "num_attention_heads", model_path)
        num_kv_heads = int_field(cfg, "num_key_value_heads", model_path, default=num_heads)
        head_dim = int_field(cfg, "head_dim", model_path, default=hidden_size // num_heads or None)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({num_heads}) in {config_file(model_path)} must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        max_position_embeddings = int_field(cfg, "max_position_embeddings", model_path, default=2048)
        rope_local_theta, rope_local_scaling = None, None
        if family == "Gemma3":
            (rope_theta, rope_scaling), (rope_local_theta, rope_local_scaling) = _gemma3_ropes(
                cfg, model_path
            )
        elif family == "Olmo3":
            (rope_theta, rope_scaling), (rope_local_theta, rope_local_scaling) = _olmo3_ropes(cfg, model_path)
        else:
            rope_theta, rope_scaling = _parse_rope(cfg, model_path, phi3=family == "Phi3")
        rotary_dim = _rotary_dim(family, cfg, head_dim, model_path)
        if rotary_dim % 2:  # (Phi-3's partial rotary_dim is checked by _rotary_dim)
            raise ValueError(
                f"head_dim {head_dim} in {config_file(model_path)} must be even: rotary embeddings turn pairs of dims"
            )
        if rope_scaling is not None and rope_scaling["rope_type"] == "longrope":
            _check_longrope(rope_scaling, rotary_dim, max_position_embeddings, model_path)
        for scaling in (rope_scaling, rope_local_scaling):
            if scaling is not None and scaling["rope_type"] == "yarn":
                resolve_yarn(scaling, cfg, max_position_embeddings, model_path)
            if scaling is not None and scaling["rope_type"] == "dynamic":
                resolve_dynamic(scaling, rotary_dim, max_position_embeddings, model_path)

        attention_bias = bool(cfg.get("attention_bias", False))
        if family == "Qwen2":
            qkv_bias = True
        elif family == "Qwen2Moe":
            qkv_bias = bool(cfg.get("qkv_bias", True))
        elif family == "Mixtral":
            qkv_bias = False
        elif family == "StableLm":
            qkv_bias = bool_field(cfg, "use_qkv_bias", model_path, default=False)
            for key in ("qk_layernorm", "use_parallel_residual"):  # StableLM 2 12B's layout
                if bool_field(cfg, key, model_path, default=False):
                    raise ValueError(
                        f"unsupported {key} true in {config_file(model_path)} for StableLmForCausalLM: weir "
                        "serves the sequential-residual StableLM layout without per-head q/k LayerNorms"
                    )
        elif family == "Starcoder2":
            qkv_bias = bool_field(cfg, "use_bias", model_path, default=True)
        elif family == "GPTNeoX":
            qkv_bias = bool_field(cfg, "attention_bias", model_path, default=True)
        elif family == "SeedOss":  # q/k/v biases by default, o_proj's apart (attention_out_bias)
            qkv_bias = bool_field(cfg, "attention_bias", model_path, default=True)
        elif family in ("Phi", "GPT2", "GPTBigCode"):
            qkv_bias = True  # every projection of Phi-1/1.5/2, GPT-2 and StarCoder has a bias
            if family == "Phi" and bool_field(cfg, "qk_layernorm", model_path, default=False):
                raise ValueError(
                    f"unsupported qk_layernorm true in {config_file(model_path)} for PhiForCausalLM: weir serves "
                    "Phi without per-head q/k LayerNorms"
                )
        elif family == "GPTJ":
            qkv_bias = False  # q/k/v and out_proj without biases, fc_in / fc_out with them
        elif family == "OPT":
            qkv_bias = bool_field(cfg, "enable_bias", model_path, default=True)
        else:
            qkv_bias = attention_bias
        o_proj_families = (
            "Llama",
            "Qwen3",
            "Qwen3Moe",
            "Granite",
            "GraniteMoe",
            "GraniteMoeShared",
            "GraniteMoeHybrid",
            "Olmo",
            "Olmo2",
            "Olmo3",
            "Olmoe",
            "SmolLM3",
            "Arcee",
            "Apertus",
            *GEMMA_FAMILIES,
        )
        o_proj_bias = attention_bias if family in o_proj_families else False
        mlp_families = ("Llama", "Granite", "SmolLM3", "Helium", "Arcee")
        mlp_bias = bool(cfg.get("mlp_bias", False)) if family in mlp_families else False
        if family in (
            "Starcoder2",
            "Phi",
            *LEARNED_POSITION_FAMILIES,
        ):  # one bias setting for every projection
            o_proj_bias = mlp_bias = qkv_bias
        if family == "GPTNeoX":  # attention_bias for query_key_value and dense; the MLP's always
            o_proj_bias, mlp_bias = qkv_bias, True
        if family == "Ernie4_5":  # one flag for every projection
            qkv_bias = o_proj_bias = mlp_bias = bool_field(cfg, "use_bias", model_path, default=False)
        if family == "SeedOss":
            o_proj_bias = bool_field(cfg, "attention_out_bias", model_path, default=False)
            mlp_bias = bool_field(cfg, "mlp_bias", model_path, default=False)
        qk_norm = family in ("Qwen3", "Qwen3Moe", "Gemma3", "Exaone4", "Apertus")
        granite_families = ("Granite", "GraniteMoe", "GraniteMoeShared", "GraniteMoeHybrid")
        granite = granite_fields(cfg, model_path) if family in granite_families else {}

        num_layers = int_field(cfg, "num_hidden_layers", model_path)
        moe = moe_fields(family, cfg, num_layers, model_path)
        rope_layers = _smollm3_rope_layers(cfg, num_layers, model_path) if family == "SmolLM3" else ()
        sliding_window, layer_types = _sliding_layers(family, cfg, num_layers, model_path, rope_layers)
        if family == "GraniteMoeHybrid":
            rope_layers = _granite_hybrid_rope_layers(cfg, num_layers, model_path)
        if family in LEARNED_POSITION_FAMILIES:  # no rotary embedding on any layer
            rope_layers = (False,) * num_layers
        if family == "Cohere2":  # transformers' Cohere2Attention rotates on its sliding layers only
            rope_layers = tuple(t == SLIDING_ATTENTION for t in layer_types) or (False,) * num_layers
        if family == "Exaone4" and sliding_window is not None:  # with windows, its full layers have no rope
            rope_layers = tuple(t == SLIDING_ATTENTION for t in layer_types)
        if family == "Cohere" and bool_field(cfg, "use_qk_norm", model_path, default=False):
            raise ValueError(
                f"unsupported use_qk_norm true in {config_file(model_path)} for CohereForCausalLM (Command R+'s "
                "per-head q/k LayerNorms): weir serves Cohere without them"
            )
        resolved_len = _resolve_max_model_len(
            max_model_len, max_position_embeddings, rope_scaling, model_path
        )
        # Gemma 2's config class defaults to both softcaps (50, 30) when config.json omits them; Gemma 3's to none
        softcaps = {
            key: _positive_or_none({key: default, **cfg}, key, model_path)
            if family in ("Gemma2", "Gemma3")
            else None
            for key, default in (
                ("attn_logit_softcapping", 50.0 if family == "Gemma2" else None),
                ("final_logit_softcapping", 30.0 if family == "Gemma2" else None),
            )
        }
        query_pre_attn_scalar = None
        if family in ("Gemma2", "Gemma3"):
            query_pre_attn_scalar = _positive_or_none(cfg, "query_pre_attn_scalar", model_path) or 256.0
        if gemma and cfg.get("use_bidirectional_attention"):
            raise ValueError(
                f"unsupported use_bidirectional_attention true in {model_path}: weir generates text, with "
                "causal attention only"
            )
        if rope_scaling is not None and rope_scaling["rope_type"] == "longrope":
            original = rope_scaling["original_max_position_embeddings"]
            rope_scaling["use_long_factor"] = resolved_len > original
            logger.info(
                "longrope: %s factors for every request (max_model_len %d %s original_max_position_embeddings %d)",
                "long" if resolved_len > original else "short",
                resolved_len,
                ">" if resolved_len > original else "<=",
                original,
            )
        for scaling in (rope_scaling, rope_local_scaling):
            if scaling is not None and scaling["rope_type"] == "dynamic":
                set_dynamic_seq_len(scaling, resolved_len)

        # A dense Granite 4.0's MLP is its shared one (named as GraniteMoeShared's; engine.model.models.moe
        # renames it): its size, not intermediate_size.
        dense_granite4 = family == "GraniteMoeHybrid" and not moe
        intermediate_size = int_field(
            cfg, "shared_intermediate_size" if dense_granite4 else "intermediate_size", model_path
        )
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos_token_ids = _as_id_list(eos)
        generation_defaults = {
            ours: gen[theirs]
            for theirs, ours in _GENERATION_DEFAULT_KEYS.items()
            if gen.get(theirs) is not None
        }
        resolved_device = resolve_device(device)
        return cls(
            model_path=model_path,
            architecture=arch,
            vocab_size=int_field(cfg, "vocab_size", model_path),
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
            rms_norm_eps=positive_number(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", model_path),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
            max_model_len=resolved_len,
            # (tied by default in the Gemma, StarCoder2, SmolLM3, Cohere, ERNIE 4.5 and learned-position configs)
            tie_word_embeddings=bool(
                cfg.get(
                    "tie_word_embeddings",
                    gemma
                    or family
                    in ("Starcoder2", "SmolLM3", "Cohere", "Cohere2", "Ernie4_5", *LEARNED_POSITION_FAMILIES),
                )
            ),
            qkv_bias=qkv_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=mlp_bias,
            qk_norm=qk_norm,
            sliding_window=sliding_window,
            eos_token_ids=eos_token_ids,
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            dtype=_resolve_dtype(dtype, resolved_device),
            device=resolved_device,
            generation_defaults=generation_defaults,
            partial_rotary_dim=0 if rotary_dim == head_dim else rotary_dim,
            rope_interleaved=family in ("Glm", "Glm4", "Cohere", "Cohere2", "Helium", "Ernie4_5", "GPTJ"),
            logit_scale=positive_number(cfg.get("logit_scale", 0.0625), "logit_scale", model_path)
            if family in ("Cohere", "Cohere2")
            else 1.0,
            hidden_act=hidden_act,
            layer_types=layer_types,
            query_pre_attn_scalar=query_pre_attn_scalar,
            attn_logit_softcapping=softcaps["attn_logit_softcapping"],
            final_logit_softcapping=softcaps["final_logit_softcapping"],
            rope_local_theta=rope_local_theta,
            rope_local_scaling=rope_local_scaling,
            qk_norm_across_heads=family in ("Olmo2", "Olmo3", "Olmoe"),
            clip_qkv=_positive_or_none(cfg, "clip_qkv", model_path) if family in ("Olmo", "Olmoe") else None,
            layer_norm_eps=_layer_norm_eps(family, cfg, model_path),
            lm_head_bias=family in ("Phi", "GPTJ"),
            rope_layers=rope_layers,
            parallel_residual=family == "GPTNeoX"
            and bool_field(cfg, "use_parallel_residual", model_path, default=True),
            **granite,
            **gpt2,
            **moe,
        )


def _granite_hybrid_rope_layers(cfg: dict[str, Any], num_layers: int, model_path: str) -> tuple[bool, ...]:
    """Granite 4.0 (`GraniteMoeHybridForCausalLM`) served where every layer is attention (`layer_types`, or
    the older `layers_block_type`, all "attention" or "full_attention": Granite-4.0-micro's kind); its Mamba
    layers ("mamba",
    "linear_attention", transformers' default) are refused naming them. Its rope only where
    `position_embedding_type` is "rope": otherwise no layer has a position embedding (NoPE, rope_layers all
    False), as transformers builds it."""
    key = "layer_types" if "layer_types" in cfg else "layers_block_type"
    types = cfg.get(key)
    attention = ("attention", FULL_ATTENTION)  # the hub's name, and transformers 5's when it saves a config
    if not isinstance(types, list) or len(types) != num_layers or any(t not in attention for t in types):
        raise ValueError(
            f"unsupported {key} {types!r} in {config_file(model_path)} for GraniteMoeHybridForCausalLM: weir "
            f"serves Granite 4.0 models whose {num_layers} layers are all 'attention' (no Mamba layers)"
        )
    rope = cfg.get("position_embedding_type")
    if rope not in (None, "rope", "nope"):
        raise ValueError(
            f"unsupported position_embedding_type {rope!r} in {config_file(model_path)}: 'rope', or none (no "
            "position embedding)"
        )
    return () if rope == "rope" else (False,) * num_layers


def _apertus_default_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with the rope transformers' ApertusConfig sets when a config gives none (no rope_parameters,
    rope_scaling or rope_theta): llama3-scaled, theta 1.2e7, factor 8 over 8,192 positions."""
    if any(key in cfg for key in ("rope_parameters", "rope_scaling", "rope_theta")):
        return cfg
    rope = {
        "rope_type": "llama3",
        "rope_theta": 12_000_000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    return {**cfg, "rope_parameters": rope}


def _gpt_neox_rope_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """GPT-NeoX's own names for the rope keys (`rotary_emb_base`, `rotary_pct`) as the other families
    spell them, where the config has no such key already (transformers' GPTNeoXConfig reads them so)."""
    params = cfg.get("rope_parameters") or {}
    out = dict(cfg)
    if "rotary_emb_base" in cfg and "rope_theta" not in cfg and "rope_theta" not in params:
        out["rope_theta"] = cfg["rotary_emb_base"]
    if "rotary_pct" in cfg and "partial_rotary_factor" not in cfg and "partial_rotary_factor" not in params:
        out["partial_rotary_factor"] = cfg["rotary_pct"]
    return out


def _gpt2_keys(cfg: dict[str, Any], model_path: str, arch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """GPT-2's (and GPT-J's) config.json under the names the other families use (n_embd -> hidden_size,
    n_layer, n_head, n_positions, n_inner: 4 x n_embd when null), as their config classes' attribute maps
    read them, and GPT-2's own fields: `scale_attn_weights` false is the softmax scale 1
    (attention_multiplier). Refused: a per-layer scale (`scale_attn_by_inverse_layer_idx`) and
    cross-attention (`add_cross_attention`)."""
    out = dict(cfg)
    for theirs, ours in (
        ("n_embd", "hidden_size"),
        ("n_layer", "num_hidden_layers"),
        ("n_head", "num_attention_heads"),
        ("n_positions", "max_position_embeddings"),
    ):
        if theirs in cfg:  # (checked here, so an error names GPT-2's field)
            out[ours] = int_field(cfg, theirs, model_path)
    hidden = int_field(out, "hidden_size", model_path)
    out["intermediate_size"] = int_field(cfg, "n_inner", model_path, default=4 * hidden)
    out.pop("num_key_value_heads", None)  # multi-head attention (GPT-2, GPT-J) ...
    if arch == "GPTBigCodeForCausalLM":  # ... or StarCoder's multi-query attention: one K/V head
        if not bool_field(cfg, "multi_query", model_path, default=True):
            raise ValueError(
                f"unsupported multi_query false in {config_file(model_path)} for GPTBigCodeForCausalLM: weir "
                "serves its multi-query checkpoints (StarCoder, SantaCoder), whose c_attn rows are [q | k | v]"
            )
        out["num_key_value_heads"] = 1
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if bool_field(cfg, key, model_path, default=False):
            raise ValueError(
                f"unsupported {key} true in {config_file(model_path)} for {arch}: weir serves GPT-2 and "
                "GPT-J decoders with one softmax scale and no cross-attention"
            )
    fields = {}
    if not bool_field(cfg, "scale_attn_weights", model_path, default=True):
        fields["attention_multiplier"] = 1.0
    return out, fields


def _opt_keys(cfg: dict[str, Any], model_path: str) -> dict[str, Any]:
    """OPT's config.json with `ffn_dim` as intermediate_size; the layouts weir does not serve refused naming
    their field: post-LayerNorm layers (`do_layer_norm_before` false, opt-350m), embeddings projected in and
    out (`word_embed_proj_dim` other than hidden_size, opt-350m), LayerNorms without weights
    (`layer_norm_elementwise_affine` false) and no final LayerNorm (`_remove_final_layer_norm`)."""
    hidden = int_field(cfg, "hidden_size", model_path)
    refusals = {
        "do_layer_norm_before": not bool_field(cfg, "do_layer_norm_before", model_path, default=True),
        "word_embed_proj_dim": int_field(cfg, "word_embed_proj_dim", model_path, default=hidden) != hidden,
        "layer_norm_elementwise_affine": not bool_field(
            cfg, "layer_norm_elementwise_affine", model_path, default=True
        ),
        "_remove_final_layer_norm": bool_field(cfg, "_remove_final_layer_norm", model_path, default=False),
    }
    for key, refused in refusals.items():
        if refused:
            raise ValueError(
                f"unsupported {key} {cfg[key]!r} in {config_file(model_path)} for OPTForCausalLM: weir serves "
                "OPT's pre-LayerNorm layout (opt-125m, opt-1.3b and larger), hidden_size-wide embeddings"
            )
    return {**cfg, "intermediate_size": int_field(cfg, "ffn_dim", model_path)}


def _layer_norm_eps(family: str, cfg: dict[str, Any], model_path: str) -> float:
    """The LayerNorms' epsilon of the families that have LayerNorms (StableLM's, Phi's, GPT-NeoX's and Cohere's
    `layer_norm_eps`, StarCoder2's `norm_epsilon`); read only there: another family's config may say anything
    under those keys."""
    keys = {family: "layer_norm_eps" for family in ("StableLm", "Phi", "GPTNeoX", "Cohere", "Cohere2")}
    key = {
        **keys,
        "Starcoder2": "norm_epsilon",
        "GPT2": "layer_norm_epsilon",
        "GPTJ": "layer_norm_epsilon",
        "GPTBigCode": "layer_norm_epsilon",
    }.get(family)
    return 1e-5 if key is None else positive_number(cfg.get(key, 1e-5), key, model_path)


def granite_fields(cfg: dict[str, Any], model_path: str) -> dict[str, float]:
    """Granite's four scalings, each a positive number (transformers' GraniteConfig defaults them to
    1.0); the attention multiplier is the softmax scale itself, in place of head_dim ** -0.5."""
    keys = ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier")
    return {key: positive_number(1.0 if cfg.get(key) is None else cfg[key], key, model_path) for key in keys}


def moe_fields(family: str, cfg: dict[str, Any], num_layers: int, model_path: str) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from a config.json ({} for a dense family).

    Mixtral: `num_local_experts` experts of `intermediate_size` in every layer, the top_k
    probabilities always renormalised, the routing weights kept in float32. Qwen2-MoE / Qwen3-MoE:
    `num_experts` (or `num_local_experts`) experts of `moe_intermediate_size`; a layer is MoE unless it
    is in `mlp_only_layers` or (layer + 1) is not a multiple of `decoder_sparse_step` (then a dense MLP
    of `intermediate_size`); `norm_topk_prob` as configured; the routing weights cast to the model
    dtype (as transformers does); Qwen2-MoE's shared expert of `shared_expert_intermediate_size`.
    GraniteMoe: Mixtral's layout (`num_local_experts` of `intermediate_size` in every layer), its router
    a softmax over the top_k logits, the weights cast to the model dtype; GraniteMoeShared adds an ungated
    shared MLP of `shared_intermediate_size` (0 or absent: none, as transformers' default). OLMoE:
    `num_experts` experts of `intermediate_size` in every layer, routed as Qwen-MoE.
    """
    if family == "Mixtral":
        num_experts = int_field(cfg, "num_local_experts", model_path)
        fields = {
            "num_experts": num_experts,
            "moe_intermediate_size": int_field(cfg, "intermediate_size", model_path),
            "norm_topk_prob": True,
            "routing_weights_in_model_dtype": False,
            "moe_layers": tuple(range(num_layers)),
        }
    elif family == "GraniteMoeHybrid" and cfg.get("num_local_experts") == 0:
        return {}  # Granite 4.0's dense models: their MLP is the shared one alone (from_dicts' intermediate_size)
    elif family in ("GraniteMoe", "GraniteMoeShared", "GraniteMoeHybrid"):
        num_experts = int_field(cfg, "num_local_experts", model_path)
        fields = {
            "num_experts": num_experts,
            "moe_intermediate_size": int_field(cfg, "intermediate_size", model_path),
            "norm_topk_prob": True,  # (a softmax over the top_k sums to 1)
            "routing_weights_in_model_dtype": True,
            "moe_layers": tuple(range(num_layers)),
            "softmax_after_topk": True,
        }
        if family in ("GraniteMoeShared", "GraniteMoeHybrid"):  # an ungated shared MLP beside the experts
            shared = cfg.get("shared_intermediate_size", 0)
            fields["shared_expert_intermediate_size"] = (
                int_field(cfg, "shared_intermediate_size", model_path) if shared else 0
            )
            fields["shared_expert_gated"] = False
    elif family == "Olmoe":  # every layer MoE, its experts intermediate_size wide; Qwen's routing
        key = "num_experts" if "num_experts" in cfg else "num_local_experts"
        num_experts = int_field(cfg, key, model_path)
        fields = {
            "num_experts": num_experts,
            "moe_intermediate_size": int_field(cfg, "intermediate_size", model_path),
            "norm_topk_prob": bool_field(cfg, "norm_topk_prob", model_path, default=False),
            "routing_weights_in_model_dtype": True,
            "moe_layers": tuple(range(num_layers)),
        }
    elif family in ("Qwen2Moe", "Qwen3Moe"):
        # The hub's configs say num_experts; transformers 5 saves it as num_local_experts.
        key = "num_experts" if "num_experts" in cfg else "num_local_experts"
        num_experts = int_field(cfg, key, model_path)
        step = int_field(cfg, "decoder_sparse_step", model_path, default=1)
        dense = cfg.get("mlp_only_layers") or []
        # (transformers ignores an index past the last layer; here it is a typo to report, not to skip)
        if not isinstance(dense, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in dense
        ):
            raise ValueError(
                f"mlp_only_layers in {config_file(model_path)} must be a list of layer indices in "
                f"[0, {num_layers}); got {dense!r}"
            )
        fields = {
            "num_experts": num_experts,
            "moe_intermediate_size": int_field(cfg, "moe_intermediate_size", model_path),
            "norm_topk_prob": bool_field(cfg, "norm_topk_prob", model_path, default=False),
            "routing_weights_in_model_dtype": True,
            "moe_layers": tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0),
        }
        if family == "Qwen2Moe":
            fields["shared_expert_intermediate_size"] = int_field(
                cfg, "shared_expert_intermediate_size", model_path
            )
    else:
        return {}
    top_k = int_field(cfg, "num_experts_per_tok", model_path)
    if top_k > num_experts:
        raise ValueError(
            f"num_experts_per_tok ({top_k}) in {model_path} is larger than the number of experts ({num_experts})"
        )
    return {**fields, "num_experts_per_tok": top_k}


def _parse_rope(
    cfg: dict[str, Any], model_path: str, default_theta: float = 10000.0, phi3: bool = False
) -> tuple[float, dict[str, Any] | None]:
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling")
    if legacy:
        params = {**legacy, **params}
    rope_theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or default_theta
    rope_theta = positive_number(rope_theta, "rope_theta", model_path)
    params.pop("partial_rotary_factor", None)  # read by _rotary_dim
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "su" or (phi3 and rope_type == "yarn"):  # Phi-3's first names for longrope (as
        rope_type = "longrope"  # transformers renames them)
    if phi3 and rope_type not in ("default", "longrope"):  # (transformers' Phi3Config refuses the others)
        raise ValueError(
            f"unsupported rope_type {rope_type!r} in {model_path}; Phi-3 takes default or longrope"
        )
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r} in {model_path}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return rope_theta, None
    params["rope_type"] = rope_type
    params.pop("type", None)
    required = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
        "longrope": ("short_factor", "long_factor"),
        "yarn": ("factor",),  # (present; null: transformers' ratio, see engine.rope_fields)
        "dynamic": ("factor",),
    }[rope_type]
    for key in required:
        if key not in params:
            raise ValueError(f"rope scaling {rope_type!r} in {model_path} is missing {key!r}")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    if rope_type == "longrope":
        # Phi-3 keeps the pretraining length at the top level, and transformers gives it priority.
        original = cfg.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings"
        )
        original = original or cfg.get("max_position_embeddings", 2048)
        if (
            not isinstance(original, int) or isinstance(original, bool) or original < 2
        ):  # log(original) divides
            raise ValueError(
                f"longrope original_max_position_embeddings in {config_file(model_path)} must be an integer "
                f"of at least 2; got {original!r}"
            )
        params["original_max_position_embeddings"] = original
    return rope_theta, params


def _rotary_dim(family: str, cfg: dict[str, Any], head_dim: int, model_path: str) -> int:
    """How many leading dims of a head rotate: Phi-3's, StableLM's, Phi's, GPT-NeoX's and GLM's
    partial_rotary_factor (top level, or in rope_parameters with transformers >= 5; StableLM's and GPT-NeoX's
    default 0.25, Phi's and GLM's 0.5); every other family rotates the whole head."""
    if family == "GPTJ":  # its own key, the count of dims (null: the whole head)
        rotary_dim = cfg.get("rotary_dim")
        if rotary_dim is None:
            return head_dim
        rotary_dim = int_field(cfg, "rotary_dim", model_path)
        if rotary_dim > head_dim or rotary_dim % 2:
            raise ValueError(
                f"rotary_dim {rotary_dim} in {config_file(model_path)} must be even and at most head_dim {head_dim}"
            )
        return rotary_dim
    if family not in ("Phi3", "StableLm", "Phi", "GPTNeoX", "Glm", "Glm4"):
        return head_dim
    factor = cfg.get("partial_rotary_factor")
    if factor is None:
        factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor")
    if factor is None:  # the config classes' defaults
        factor = {"StableLm": 0.25, "Phi": 0.5, "GPTNeoX": 0.25, "Glm": 0.5, "Glm4": 0.5}.get(family, 1.0)
    factor = positive_number(factor, "partial_rotary_factor", model_path)
    rotary_dim = int(head_dim * factor)
    if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise ValueError(
            f"partial_rotary_factor {factor} in {model_path} gives rotary_dim {rotary_dim} for head_dim "
            f"{head_dim}; it must be even and in (0, head_dim]"
        )
    return rotary_dim


def _check_longrope(
    params: dict[str, Any], rotary_dim: int, max_position_embeddings: int, model_path: str
) -> None:
    """Validate longrope's factor lists and resolve its attention factor (cos and sin are scaled by
    it, short and long alike), as transformers' _compute_longrope_parameters does."""
    for key in ("short_factor", "long_factor"):
        values = params[key]
        bad = next(
            (i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, float))), None
        ) if isinstance(values, list) else None  # fmt: skip
        if not isinstance(values, list) or len(values) != rotary_dim // 2 or bad is not None:
            got = type(values).__name__ if not isinstance(values, list) else len(values)
            got = f"{values[bad]!r} at index {bad}" if bad is not None else got
            raise ValueError(
                f"rope scaling 'longrope' in {model_path}: {key} must be a list of rotary_dim / 2 = "
                f"{rotary_dim // 2} numbers; got {got}"
            )
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:  # Phi-3: the ratio of the extended to the pretraining length
        factor = max_position_embeddings / original
    factor = positive_number(factor, "longrope factor", model_path)
    if params.get("attention_factor") is not None:
        positive_number(params["attention_factor"], "longrope attention_factor", model_path)
    else:
        params["attention_factor"] = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    params["attention_factor"] = float(params["attention_factor"])


def _gemma3_ropes(
    cfg: dict[str, Any], model_path: str
) -> tuple[tuple[float, dict[str, Any] | None], tuple[float, dict[str, Any] | None]]:
    """((theta, scaling) of the global layers, (theta, scaling) of the sliding ones): transformers >= 5
    nests them in rope_parameters by layer type; older configs have rope_theta + rope_scaling (global)
    and rope_local_base_freq (sliding, no scaling). Defaults are transformers': 1e6 and 1e4."""
    params = cfg.get("rope_parameters") or {}
    if FULL_ATTENTION in params or SLIDING_ATTENTION in params:
        full = _parse_rope({"rope_parameters": params.get(FULL_ATTENTION) or {}}, model_path, 1_000_000.0)
        local = _parse_rope({"rope_parameters": params.get(SLIDING_ATTENTION) or {}}, model_path, 10_000.0)
        return full, local
    full = _parse_rope(cfg, model_path, 1_000_000.0)
    return full, (float(cfg.get("rope_local_base_freq") or 10_000.0), None)


def _hidden_act(family: str, cfg: dict[str, Any], model_path: str) -> str:
    """The MLP's activation: SiLU for the Llama family, the tanh-approximate GELU for Gemma (whose first
    release's config says "gelu", which transformers reads as the tanh approximation)."""
    if family in ("Gemma2", "Gemma3"):
        key, act = "hidden_activation", cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    elif family == "Gemma":
        key, act = "hidden_act", cfg.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    elif family == "Starcoder2":
        key, act = "hidden_act", cfg.get("hidden_act", "gelu_pytorch_tanh")
    elif family == "Phi":
        key, act = "hidden_act", cfg.get("hidden_act", "gelu_new")
    elif family == "GPTNeoX":
        key, act = "hidden_act", cfg.get("hidden_act", "gelu")
    elif family in ("GPT2", "GPTJ"):
        key, act = "activation_function", cfg.get("activation_function", "gelu_new")
    elif family == "GPTBigCode":
        key, act = "activation_function", cfg.get("activation_function", "gelu_pytorch_tanh")
    elif family == "OPT":
        key, act = "activation_function", cfg.get("activation_function", "relu")
    elif family == "Arcee":
        key, act = "hidden_act", cfg.get("hidden_act", "relu2")
    elif family == "Apertus":
        key, act = "hidden_act", cfg.get("hidden_act", "xielu")
    else:
        key, act = "hidden_act", cfg.get("hidden_act", "silu")
    if family in (
        "Starcoder2",
        "Phi",
        "GPTNeoX",
        "GPT2",
        "GPTJ",
        "GPTBigCode",
    ):  # their plain MLP: torch's GELU, either form
        supported: tuple[str, ...] = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")
    elif family == "OPT":
        supported = ("relu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")
    elif family == "Arcee":  # its plain MLP: ReLU squared
        supported = ("relu2",)
    elif family == "Apertus":  # its plain MLP: xIELU with learned scalars
        supported = ("xielu",)
    else:
        supported = ("gelu_pytorch_tanh",) if family in GEMMA_FAMILIES else ("silu",)
    if act not in supported:
        names = " or ".join(repr(a) for a in supported)
        raise ValueError(f"unsupported {key} {act!r} in {model_path}; only {names} is supported")
    return act


def _sliding_layers(
    family: str, cfg: dict[str, Any], num_layers: int, model_path: str, rope_layers: tuple[bool, ...] = ()
) -> tuple[int | None, tuple[str, ...]]:
    """(window, per-layer types) as transformers builds them; (None, ()) where no layer has a window.
    A window is a positive integer: 0, a negative, a bool or a float is refused (transformers' masks
    would hide every key, or the window would run other than the checkpoint says). The families whose
    windows are on or off by config (Mistral, Mixtral, Phi-3; Qwen with use_sliding_window) take null
    as no window; Gemma 2/3 always have one."""
    window = cfg.get("sliding_window")
    if family in ("Mistral", "Mixtral", "Phi3", "Starcoder2"):  # every layer (Phi-3-mini-4k: 2047)
        if window is None:
            return None, ()
        return _window(window, model_path, nullable=True), (SLIDING_ATTENTION,) * num_layers
    if family in ("Qwen2", "Qwen3", "Qwen2Moe", "Qwen3Moe"):
        if not bool_field(cfg, "use_sliding_window", model_path, default=False) or window is None:
            return None, ()
        window = _window(window, model_path, nullable=True)
        first = cfg.get("max_window_layers", 28)  # transformers' default
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ValueError(
                f"max_window_layers in {config_file(model_path)} must be a non-negative integer; got {first!r}"
            )
        if family == "Qwen3Moe":  # transformers windows every layer (it reads no layer_types)
            return window, (SLIDING_ATTENTION,) * num_layers
        if family == "Qwen2Moe":  # transformers' Qwen2MoeConfig: even layers below max_window_layers
            default = [
                SLIDING_ATTENTION if (i + 1) % 2 and i < first else FULL_ATTENTION for i in range(num_layers)
            ]
        else:
            default = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)]
    elif family == "SmolLM3":  # transformers' SmolLM3Config: the NoPE layers slide, when windows are on
        if not bool_field(cfg, "use_sliding_window", model_path, default=False) or window is None:
            return None, ()
        window = _window(window, model_path, nullable=True)
        default = [FULL_ATTENTION if rope else SLIDING_ATTENTION for rope in rope_layers]
    elif family == "Ministral":  # transformers' MinistralConfig: every layer slides when there is a window
        if window is None:
            return None, ()
        window = _window(window, model_path, nullable=True)
        default = [SLIDING_ATTENTION] * num_layers
    elif (
        family == "Cohere2"
    ):  # transformers' Cohere2Config: sliding_window_pattern - 1 sliding layers, a full one
        window = _window(window, model_path, nullable=False)
        pattern = int_field(cfg, "sliding_window_pattern", model_path, default=4)
        default = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers)]
    elif (
        family == "Exaone4"
    ):  # transformers' Exaone4Config: sliding_window_pattern - 1 sliding layers, a full one
        if window is None:
            return None, ()
        window = _window(window, model_path, nullable=True)
        pattern = int_field(cfg, "sliding_window_pattern", model_path, default=4)
        default = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers)]
    elif family == "Olmo3":  # transformers' Olmo3Config: three sliding layers, then a full one
        window = _window(window, model_path, nullable=False)
        default = [SLIDING_ATTENTION if (i + 1) % 4 else FULL_ATTENTION for i in range(num_layers)]
    elif family == "Gemma2":
        window = _window(window, model_path, nullable=False)
        default = [SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(num_layers)]
    elif family == "Gemma3":
        window = _window(window, model_path, nullable=False)
        key = "sliding_window_pattern" if "sliding_window_pattern" in cfg else "_sliding_window_pattern"
        pattern = int_field(cfg, key, model_path, default=6)
        default = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers)]
    else:
        return None, ()
    types = cfg.get("layer_types") or default
    if (
        not isinstance(types, list)
        or len(types) != num_layers
        or any(t not in (FULL_ATTENTION, SLIDING_ATTENTION) for t in types)
    ):
        raise ValueError(
            f"unsupported layer_types {types!r} in {config_file(model_path)}: expected {num_layers} entries "
            f"(num_hidden_layers), each {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}"
        )
    return (window, tuple(types)) if SLIDING_ATTENTION in types else (None, ())


def _smollm3_rope_layers(cfg: dict[str, Any], num_layers: int, model_path: str) -> tuple[bool, ...]:
    """SmolLM3's `no_rope_layers`: per layer 1 where it rotates, 0 where it has no position embedding
    (NoPE); absent, every `no_rope_layer_interval`-th layer (default 4) is NoPE, as SmolLM3Config builds it."""
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = int_field(cfg, "no_rope_layer_interval", model_path, default=4)
        return tuple((i + 1) % interval != 0 for i in range(num_layers))
    if (
        not isinstance(flags, list)
        or len(flags) != num_layers
        or any(f not in (0, 1) or isinstance(f, float) for f in flags)
    ):
        raise ValueError(
            f"no_rope_layers in {config_file(model_path)} must be a list of {num_layers} entries "
            f"(num_hidden_layers), each 1 (rotary) or 0 (no position embedding); got {flags!r}"
        )
    return tuple(bool(f) for f in flags)


def _olmo3_ropes(
    cfg: dict[str, Any], model_path: str
) -> tuple[tuple[float, dict[str, Any] | None], tuple[float, dict[str, Any] | None]]:
    """((theta, scaling) of the full layers, (theta, scaling) of the sliding ones) as transformers'
    Olmo3Config reads them: nested in rope_parameters by layer type, each theta 500,000 when left out; in
    the older top-level form, rope_theta and rope_scaling go to the full layers only, and the sliding
    layers keep the plain default (500,000, no scaling)."""
    params = cfg.get("rope_parameters") or {}
    default = 500_000.0
    if FULL_ATTENTION in params or SLIDING_ATTENTION in params:
        full = _parse_rope({"rope_parameters": params.get(FULL_ATTENTION) or {}}, model_path, default)
        local = _parse_rope({"rope_parameters": params.get(SLIDING_ATTENTION) or {}}, model_path, default)
        return full, local
    return _parse_rope(cfg, model_path, default), (default, None)


def _window(value: Any, model_path: str, nullable: bool) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "a positive integer or null" if nullable else "a positive integer"
        raise ValueError(f"sliding_window in {config_file(model_path)} must be {allowed}; got {value!r}")
    return value


def _positive_or_none(cfg: dict[str, Any], key: str, model_path: str) -> float | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{key} must be a positive number or null; got {value!r} in {model_path}")
    return float(value)


def _resolve_max_model_len(
    requested: int | None,
    max_position_embeddings: int,
    rope_scaling: dict[str, Any] | None,
    model_path: str,
) -> int:
    """The user's max_model_len, at most the model's length (yarn and dynamic scale it, as vLLM), else
    the default (engine.rope_fields.default_max_model_len)."""
    if requested is None:
        return default_max_model_len(rope_scaling, max_position_embeddings)
    if not isinstance(requested, int) or isinstance(requested, bool) or requested <= 0:
        raise ValueError(f"max_model_len must be a positive integer; got {requested!r}")
    limit, why = scaled_max_len(rope_scaling, max_position_embeddings)
    if requested > limit and limit == max_position_embeddings:
        raise ValueError(
            f"max_model_len ({requested}) is larger than the model's max_position_embeddings "
            f"({max_position_embeddings}) in {model_path}"
        )
    if requested > limit:
        raise ValueError(
            f"max_model_len ({requested}) is larger than the model's scaled length {limit} ({why}) in {model_path}"
        )
    return requested


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for v in items:
        if int(v) not in out:
            out.append(int(v))
    return out


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when torch sees a GPU, else "cpu"."""
    if device in ("cpu", "cuda"):
        return device
    if device != "auto":
        raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype in ("float32", "float16", "bfloat16"):
        return dtype
    if dtype != "auto":
        raise ValueError(f"dtype must be one of auto, float32, float16, bfloat16; got {dtype!r}")
    if device == "cpu":
        return "float32"
    import torch  # noqa: PLC0415

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
