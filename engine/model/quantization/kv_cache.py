"""FP8 KV-cache scales, read from the checkpoint where its tools wrote them.

An fp8 cache (EngineConfig.kv_cache_dtype fp8 / fp8_e4m3 / fp8_e5m2) stores key / k_scale and reads
cache * k_scale (likewise V), one scale per KV head per layer (ops/reference.py). The scales are 1.0
unless the checkpoint holds them, under one of the names the ecosystem writes:
- `model.layers.N.self_attn.k_scale` / `v_scale`: llm-compressor (compressed-tensors `kv_cache_scheme`)
  and vLLM's own fp8 checkpoints;
- `self_attn.k_proj.output_scale` / `v_proj.output_scale`: compressed-tensors before it wrote k_scale;
- `self_attn.k_proj.k_scale` / `v_proj.v_scale`: NVIDIA ModelOpt;
- `self_attn.kv_scale`: AutoFP8's single scale for both (deprecated there; vLLM reads it as both).
(vLLM, vllm/model_executor/model_loader/weight_utils.py, maybe_remap_kv_scale_name, maps the same.)

A scale is per tensor (one value: shape (), [1], ...) or per KV head: [num_kv_heads] of the whole
model, or [num_kv_heads, 1, 1] as compressed-tensors' `attn_head` strategy shapes it (trailing 1s are
dropped). A per-tensor scale fills every head's entry; a per-head one gives each tensor-parallel rank
its own heads' slice (Attention.kv_head_offset). Any other shape, or a value that is not a positive
finite number, is refused at load naming the tensor.

The scales are not model parameters: a checkpoint without them must load, and a cache in the model
dtype ignores them. The runner calls `load_kv_cache_scales` once after loading the weights; the weight
loader skips these names (`is_kv_scale_name`) instead of warning about them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
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


@dataclass(frozen=True)
class KVScale:
    """One checkpoint scale: its values ([] per tensor or [heads] per head, float32) and where it came
    from, for errors that name it."""

    values: torch.Tensor  # [] or [heads] float32, on the CPU
    shape: tuple[int, ...]  # the tensor's shape in the checkpoint
    source: str  # "<tensor name> in <file name>"


def kv_scale_target(name: str) -> tuple[str, str] | None:
    """A checkpoint tensor name -> (its attention block's prefix, "k" | "v" | "kv"), or None when the
    tensor is not a KV-cache scale."""
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".self_attn", kind
    return None


def is_kv_scale_name(name: str) -> bool:
    return kv_scale_target(name) is not None


def _read_scale(tensor: torch.Tensor, source: str) -> KVScale:
    shape = tuple(tensor.shape)
    while shape and shape[-1] == 1:  # [heads, 1, 1] (compressed-tensors attn_head), [1]: trailing 1s
        shape = shape[:-1]
    if len(shape) > 1:
        raise ValueError(
            f"{source}: a KV-cache scale of shape {tuple(tensor.shape)}; weir reads one scale per tensor "
            "(a scalar) or one per KV head ([num_kv_heads])"
        )
    values = tensor.float().reshape(shape)  # [] or [heads]
    bad = ~(torch.isfinite(values) & (values > 0))
    if bad.any():
        got = values[bad].flatten()[0].item()
        raise ValueError(f"{source}: a KV-cache scale must be positive; got {got}")
    return KVScale(values, tuple(tensor.shape), source)


def read_kv_cache_scales(files: list[Path]) -> dict[str, dict[str, KVScale]]:
    """{attention block prefix: {"k": scale, "v": scale}} of every KV-cache scale in the safetensors
    `files` (only the matching tensors are read)."""
    scales: dict[str, dict[str, KVScale]] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                target = kv_scale_target(name)
                if target is None:
                    continue
                scale = _read_scale(f.get_tensor(name), f"{name} in {file.name}")
                prefix, kind = target
                entry = scales.setdefault(prefix, {})
                for k in ("k", "v") if kind == "kv" else (kind,):
                    entry[k] = scale
    return scales


def _rank_slice(scale: KVScale, layer: Attention) -> torch.Tensor:
    """The layer's [num_kv_heads] scales from a checkpoint scale: a per-tensor value repeated, or this
    rank's heads of a per-head one."""
    values = scale.values
    if values.dim() == 0:
        return values.expand(layer.num_kv_heads)
    total = layer.total_num_kv_heads
    if values.shape[0] != total:
        raise ValueError(
            f"{scale.source}: a KV-cache scale of shape {scale.shape}; weir reads one scale per tensor "
            f"(a scalar) or one per KV head ([{total}]: the model has {total} KV heads)"
        )
    return values[layer.kv_head_offset : layer.kv_head_offset + layer.num_kv_heads]


def load_kv_cache_scales(model: nn.Module, files: list[Path]) -> int:
    """Copy the checkpoint's scales into each attention layer's `k_scale` / `v_scale` buffers (left
    at 1.0 where it has none); returns how many layers got a scale. Layers without buffers (a cache
    in the model's dtype) are skipped."""
    scales = read_kv_cache_scales(files)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    found = 0
    for layer in layers:
        entry = scales.pop(layer.prefix.removesuffix(".attn"), None)
        if entry is None or layer.k_scale is None or layer.v_scale is None:
            continue
        for kind, buffer in (("k", layer.k_scale), ("v", layer.v_scale)):
            if kind in entry:
                buffer.copy_(_rank_slice(entry[kind], layer))  # in place: the buffer the kernels read
        found += 1
    if scales:
        raise ValueError(
            f"KV-cache scales for attention blocks the model does not have: {', '.join(sorted(scales))}"
        )
    if 0 < found < len(layers):
        logger.warning("KV-cache scales for %d of %d layers; the others use 1.0", found, len(layers))
    return found
