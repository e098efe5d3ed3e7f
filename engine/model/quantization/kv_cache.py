"""FP8 KV-cache scales, read from the checkpoint where its tools wrote them.

An fp8 cache (EngineConfig.kv_cache_dtype fp8 / fp8_e4m3 / fp8_e5m2) stores key / k_scale and reads
cache * k_scale (likewise V), one scale per tensor per layer (ops/reference.py). The scales are 1.0
unless the checkpoint holds them, under one of the names the ecosystem writes:
- `model.layers.N.self_attn.k_scale` / `v_scale`: llm-compressor (compressed-tensors `kv_cache_scheme`)
  and vLLM's own fp8 checkpoints;
- `self_attn.k_proj.output_scale` / `v_proj.output_scale`: compressed-tensors before it wrote k_scale;
- `self_attn.k_proj.k_scale` / `v_proj.v_scale`: NVIDIA ModelOpt;
- `self_attn.kv_scale`: AutoFP8's single scale for both (deprecated there; vLLM reads it as both).
(vLLM, vllm/model_executor/model_loader/weight_utils.py, maybe_remap_kv_scale_name, maps the same.)
A scale per head, or one that is not a positive finite number, is refused naming the tensor.

The scales are not model parameters: a checkpoint without them must load, and a cache in the model
dtype ignores them. The runner calls `load_kv_cache_scales` once after loading the weights; the weight
loader skips these names (`is_kv_scale_name`) instead of warning about them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from safetensors import safe_open
from torch import nn

from engine.model.layers.attention import Attention

logger = logging.getLogger("weir.engine")

# checkpoint name suffix -> which scale it is ("kv": one for both)
_SUFFIXES: dict[str, str] = {
    ".self_attn.k_scale": "k",
    ".self_attn.v_scale": "v",
    ".self_attn.kv_scale": "kv",
    ".self_attn.k_proj.output_scale": "k",
    ".self_attn.v_proj.output_scale": "v",
    ".self_attn.k_proj.k_scale": "k",
    ".self_attn.v_proj.v_scale": "v",
}


def kv_scale_target(name: str) -> tuple[str, str] | None:
    """A checkpoint tensor name -> (its attention block's prefix, "k" | "v" | "kv"), or None when the
    tensor is not a KV-cache scale."""
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".self_attn", kind
    return None


def is_kv_scale_name(name: str) -> bool:
    return kv_scale_target(name) is not None


def read_kv_cache_scales(files: list[Path]) -> dict[str, dict[str, float]]:
    """{attention block prefix: {"k": scale, "v": scale}} of every KV-cache scale in the safetensors
    `files` (only the matching tensors are read)."""
    scales: dict[str, dict[str, float]] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                target = kv_scale_target(name)
                if target is None:
                    continue
                tensor = f.get_tensor(name)
                if tensor.numel() != 1:
                    raise ValueError(
                        f"{name} in {file.name}: a KV-cache scale of shape {tuple(tensor.shape)}; weir reads "
                        "one scale per tensor (per-head scales are not supported)"
                    )
                value = float(tensor.float().item())
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"{name} in {file.name}: a KV-cache scale must be positive; got {value}")
                prefix, kind = target
                entry = scales.setdefault(prefix, {})
                for k in ("k", "v") if kind == "kv" else (kind,):
                    entry[k] = value
    return scales


def load_kv_cache_scales(model: nn.Module, files: list[Path]) -> int:
    """Set each attention layer's `k_scale` / `v_scale` from the checkpoint (1.0 where it has none);
    returns how many layers got a scale."""
    scales = read_kv_cache_scales(files)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    found = 0
    for layer in layers:
        entry = scales.pop(layer.prefix.removesuffix(".attn"), None)
        if entry is None:
            continue
        layer.k_scale = entry.get("k", 1.0)
        layer.v_scale = entry.get("v", 1.0)
        found += 1
    if scales:
        raise ValueError(
            f"KV-cache scales for attention blocks the model does not have: {', '.join(sorted(scales))}"
        )
    if 0 < found < len(layers):
        logger.warning("KV-cache scales for %d of %d layers; the others use 1.0", found, len(layers))
    return found
