"""Paged attention layer: writes this step's K/V into the layer's cache, then attends over the cache.

The kernels come from the layer's `attn_backend` (engine.model.layers.attention_backend), chosen once
by the runner; every layer of a model holds the same backend. The runner binds `k_cache`/`v_cache`
(the backend's `kv_cache_shape`, in its `kv_cache_dtype`) after allocating them; the step's
AttentionMetadata comes from the forward context.

An fp8 cache's per-tensor scales are `k_scale`/`v_scale`, python floats (1.0 unless the checkpoint
gives them: engine.model.kv_cache_scales sets them once after loading), handed to both kernels; a
cache in the model's dtype keeps 1.0, which the kernels treat as no scaling.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.layers.attention_backend import AttentionBackend
from engine.worker.attention_metadata import get_attention_metadata


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        layer_idx: int,
        attn_backend: AttentionBackend,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.layer_idx = layer_idx
        self.attn_backend = attn_backend
        self.prefix = prefix
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None
        self.k_scale = 1.0  # cache value * k_scale = key (fp8 caches)
        self.v_scale = 1.0

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError(f"attention layer {self.layer_idx} has no KV cache bound")
        md = get_attention_metadata()
        backend = self.attn_backend
        num_tokens = query.shape[0]
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        backend.write_kv_cache(
            key, value, self.k_cache, self.v_cache, md.slot_mapping, self.k_scale, self.v_scale
        )
        out = backend.paged_attention(
            query.view(num_tokens, self.num_heads, self.head_dim),
            self.k_cache,
            self.v_cache,
            md.block_tables,
            md.seq_lens,
            md.query_start_loc,
            md.max_query_len,
            md.max_seq_len,
            self.scale,
            self.k_scale,
            self.v_scale,
        )
        return out.view(num_tokens, self.num_heads * self.head_dim)
