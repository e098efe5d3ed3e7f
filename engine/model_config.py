"""What the engine needs to know about a checkpoint, read once from its config.json and
generation_config.json and validated here, so model code and the runner trust the values.

Handles both rope formats: transformers < 5 (`rope_theta` + `rope_scaling`) and transformers >= 5
(`rope_parameters` holding `rope_theta` and `rope_type`).

Sliding-window attention per layer (`layer_types`, transformers' names): Mistral's window on every
layer; Qwen2/Qwen3 with `use_sliding_window` on layers from `max_window_layers` on (or as `layer_types`
says); Gemma 2 alternating (sliding first); Gemma 3 every `sliding_window_pattern`-th layer global (or as
`layer_types` says), its sliding layers with their own rope (`rope_local_base_freq`). The Gemma families'
other settings (GeGLU, query_pre_attn_scalar, logit softcaps) are read here too; values weir does not
implement are refused naming the field.

Plain Python: torch is imported only to resolve device/dtype "auto".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.model.models.registry import SUPPORTED_ARCHITECTURES

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
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
    rope_scaling: dict[str, Any] | None  # None for plain rope; else has "rope_type" (linear, llama3)
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
    hidden_act: str = "silu"  # "silu", or "gelu_pytorch_tanh" (the Gemma families' GeGLU)
    # per layer: "full_attention" or "sliding_attention" (the window above); empty: every layer full
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: softmax scale this ** -0.5, not head_dim's
    attn_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2)
    # Gemma 3's sliding layers' own rope (rope_local_base_freq); None: every layer the one above
    rope_local_theta: float | None = None
    rope_local_scaling: dict[str, Any] | None = None

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer `layer_idx`, or None where it attends to its whole context (also
        where the window holds every position up to max_model_len: the kernels need no window then)."""
        if self.layer_types and self.layer_types[layer_idx] == SLIDING_ATTENTION:
            window = self.sliding_window
            return window if window is not None and window < self.max_model_len else None
        return None

    def layer_rope(self, layer_idx: int) -> tuple[float, dict[str, Any] | None]:
        """(rope_theta, rope_scaling) of layer `layer_idx` (Gemma 3's sliding layers have their own)."""
        if self.rope_local_theta is not None and self.layer_window(layer_idx) is not None:
            return self.rope_local_theta, self.rope_local_scaling
        return self.rope_theta, self.rope_scaling

    @property
    def attention_bias(self) -> bool:
        return self.qkv_bias

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
        family = arch.removesuffix("ForCausalLM")
        gemma = family in GEMMA_FAMILIES
        hidden_act = _hidden_act(family, cfg, model_path)

        hidden_size = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = int(cfg.get("head_dim") or hidden_size // num_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        max_position_embeddings = int(cfg.get("max_position_embeddings", 2048))
        rope_local_theta, rope_local_scaling = None, None
        if family == "Gemma3":
            (rope_theta, rope_scaling), (rope_local_theta, rope_local_scaling) = _gemma3_ropes(
                cfg, model_path
            )
        else:
            rope_theta, rope_scaling = _parse_rope(cfg, model_path)

        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = True if family == "Qwen2" else attention_bias
        o_proj_bias = attention_bias if family in ("Llama", "Qwen3", *GEMMA_FAMILIES) else False
        mlp_bias = bool(cfg.get("mlp_bias", False)) if family == "Llama" else False
        qk_norm = family in ("Qwen3", "Gemma3")

        num_layers = int(cfg["num_hidden_layers"])
        sliding_window, layer_types = _sliding_layers(family, cfg, num_layers, model_path)
        resolved_len = _resolve_max_model_len(max_model_len, max_position_embeddings, model_path)
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
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
            max_model_len=resolved_len,
            # (the Gemma configs' default is tied)
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
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
            hidden_act=hidden_act,
            layer_types=layer_types,
            query_pre_attn_scalar=query_pre_attn_scalar,
            attn_logit_softcapping=softcaps["attn_logit_softcapping"],
            final_logit_softcapping=softcaps["final_logit_softcapping"],
            rope_local_theta=rope_local_theta,
            rope_local_scaling=rope_local_scaling,
        )


def _parse_rope(
    cfg: dict[str, Any], model_path: str, default_theta: float = 10000.0
) -> tuple[float, dict[str, Any] | None]:
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling")
    if legacy:
        params = {**legacy, **params}
    rope_theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or default_theta)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r} in {model_path}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return rope_theta, None
    params["rope_type"] = rope_type
    params.pop("type", None)
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    for key in required:
        if key not in params:
            raise ValueError(f"rope scaling {rope_type!r} in {model_path} is missing {key!r}")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return rope_theta, params


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
    else:
        key, act = "hidden_act", cfg.get("hidden_act", "silu")
    supported = "gelu_pytorch_tanh" if family in GEMMA_FAMILIES else "silu"
    if act != supported:
        raise ValueError(f"unsupported {key} {act!r} in {model_path}; only {supported!r} is supported")
    return act


def _sliding_layers(
    family: str, cfg: dict[str, Any], num_layers: int, model_path: str
) -> tuple[int | None, tuple[str, ...]]:
    """(window, per-layer types) as transformers builds them; (None, ()) where no layer has a window."""
    window = cfg.get("sliding_window")
    if family == "Mistral":
        return (int(window), (SLIDING_ATTENTION,) * num_layers) if window else (None, ())
    if family in ("Qwen2", "Qwen3"):
        if not (window and cfg.get("use_sliding_window", False)):
            return None, ()
        first = int(cfg.get("max_window_layers", 28))  # transformers' default
        default = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)]
    elif family == "Gemma2":
        window = window or 4096
        default = [SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(num_layers)]
    elif family == "Gemma3":
        window = window or 4096
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        default = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers)]
    else:
        return None, ()
    types = tuple(cfg.get("layer_types") or default)
    if len(types) != num_layers or any(t not in (FULL_ATTENTION, SLIDING_ATTENTION) for t in types):
        raise ValueError(
            f"unsupported layer_types {list(types)} in {model_path}: expected {num_layers} entries (num_hidden_layers), "
            f"each {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}"
        )
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer; got {window!r} in {model_path}")
    return (window, types) if SLIDING_ATTENTION in types else (None, ())


def _positive_or_none(cfg: dict[str, Any], key: str, model_path: str) -> float | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{key} must be a positive number or null; got {value!r} in {model_path}")
    return float(value)


def _resolve_max_model_len(requested: int | None, max_position_embeddings: int, model_path: str) -> int:
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested <= 0:
            raise ValueError(f"max_model_len must be a positive integer; got {requested!r}")
        if requested > max_position_embeddings:
            raise ValueError(
                f"max_model_len ({requested}) is larger than the model's max_position_embeddings "
                f"({max_position_embeddings}) in {model_path}"
            )
        length = requested
    else:
        length = max_position_embeddings
    return length


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
