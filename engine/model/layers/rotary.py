"""Rotary position embedding (neox style: rotate the two halves of the rotated part of each head),
over the rotary_embedding kernel of the model's `Kernels` (ops).

The cos/sin cache is built in float32 with the same expressions as transformers'
`modeling_rope_utils` (default, "linear", "llama3", "longrope", "yarn" and "dynamic" rope types), so
positions embed bit-identically. Its rows are `rotary_dim` wide: with Phi-3's partial_rotary_factor
only the first rotary_dim dims of a head rotate (the kernels take the width from the cache) and the
rest pass through.

longrope (Phi-3) has two sets of per-frequency factors; which one this cache holds was decided once
per engine from max_model_len (engine.model_config: the long factors when max_model_len is larger
than original_max_position_embeddings, as vLLM), and its attention factor scales cos and sin, as
yarn's does. dynamic (Dynamic NTK) has one base per engine, for the sequence length engine.rope_fields
chose from max_model_len (transformers recomputes it per forward; see there).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ops import TORCH_KERNELS, Kernels


def compute_inv_freq(
    rotary_dim: int, base: float, rope_scaling: dict[str, Any] | None = None
) -> torch.Tensor:
    """[rotary_dim / 2] float32 inverse frequencies, scaled per `rope_scaling["rope_type"]`."""
    dim = rotary_dim
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type == "longrope":
        assert rope_scaling is not None
        key = "long_factor" if rope_scaling["use_long_factor"] else "short_factor"
        ext_factors = torch.tensor(rope_scaling[key], dtype=torch.float32)  # [rotary_dim / 2]
        # transformers' order of operations (1 / (factor * base ** x)), for identical bits.
        inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (ext_factors * base**inv_freq_shape)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if rope_type == "default":
        return inv_freq
    assert rope_scaling is not None
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        factor = rope_scaling["factor"]
        low_freq_factor = rope_scaling["low_freq_factor"]
        high_freq_factor = rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, base, rope_scaling)
    if rope_type == "dynamic":
        return _dynamic_ntk_inv_freq(dim, base, rope_scaling)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _yarn_inv_freq(dim: int, base: float, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than beta_slow times over the pretraining length are
    interpolated (divided by factor), those that turn more than beta_fast times kept, a linear ramp between
    (in transformers' order of operations, for identical bits)."""
    factor = rope_scaling["factor"]
    original = rope_scaling["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:  # the dim that turns num_rotations times
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope_scaling["beta_fast"]), correction_dim(rope_scaling["beta_slow"])
    if rope_scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (no zero-width ramp)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)  # [rotary_dim / 2]
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor


def _dynamic_ntk_inv_freq(dim: int, base: float, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """Dynamic NTK: the base raised for rope_scaling["seq_len"] (at most max_position_embeddings: the
    plain base, computed through the same float expression as transformers' for identical bits)."""
    factor, trained = rope_scaling["factor"], rope_scaling["max_position_embeddings"]
    base = base * ((factor * rope_scaling["seq_len"] / trained) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def build_cos_sin_cache(
    rotary_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None = None
) -> torch.Tensor:
    """[max_position, rotary_dim] float32: cos(pos * inv_freq) in the first half, sin in the second
    (times longrope's or yarn's attention factor)."""
    inv_freq = compute_inv_freq(rotary_dim, base, rope_scaling)  # [rotary_dim / 2]
    positions = torch.arange(max_position, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]  # [max_position, rotary_dim / 2]
    cos, sin = freqs.cos(), freqs.sin()
    attention_factor = (rope_scaling or {}).get("attention_factor")
    if attention_factor is not None:
        cos, sin = cos * attention_factor, sin * attention_factor
    return torch.cat((cos, sin), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        kernels: Kernels = TORCH_KERNELS,
        prefix: str = "",
        rotary_dim: int | None = None,  # None: the whole head rotates
        identity: bool = False,  # a layer without position embedding (SmolLM3's NoPE layers)
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.kernels = kernels
        self.prefix = prefix
        # Kept float32 whatever the model dtype; not a checkpoint tensor (persistent=False).
        if identity:  # cos 1, sin 0: q * 1 + rotate(q) * 0 is q exactly, through the same kernels
            half = torch.ones(max_position, self.rotary_dim // 2)
            cache = torch.cat((half, torch.zeros_like(half)), dim=-1)
        else:
            cache = build_cos_sin_cache(self.rotary_dim, max_position, base, rope_scaling)
        self.register_buffer("cos_sin_cache", cache, persistent=False)  # [max_position, rotary_dim]

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.rotary_embedding(positions, query, key, self.cos_sin_cache, self.head_dim)
