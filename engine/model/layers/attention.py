"""Paged attention layer: writes this step's K/V into the layer's cache, then attends over the cache.

The kernels come from the layer's `attn_backend` (engine.model.layers.attention_backend), chosen once
by the runner; every layer of a model holds the same backend. The runner binds `k_cache`/`v_cache`
(the backend's `kv_cache_shape`, in its `kv_cache_dtype`) after allocating them; the step's
AttentionMetadata comes from the forward context.

An fp8 cache's scales are `k_scale`/`v_scale`: float32 buffers of shape [num_kv_heads] on the model's
device, one per KV head this rank holds (1.0 unless the checkpoint gives them:
engine.model.quantization.kv_cache copies them in once after loading; a per-tensor scale fills every
entry). Both kernels read them on the device, so CUDA graphs replay them as loaded. A cache in the
model's dtype has none (None): the kernels scale nothing.

With tensor parallelism a rank holds KV heads [kv_head_offset, kv_head_offset + num_kv_heads) of the
model's total_num_kv_heads (one replicated head when tp_size > total_num_kv_heads), which is the slice
of a checkpoint's per-head scales it takes.

Decode batches (one token a sequence) rotate, store K/V and attend in one launch (ops decode_attention:
one kernel per layer fewer; outputs and caches bit for bit the two launches', tests/ops/test_decode_attention.py,
and on an H200 at Llama-3-8B and Qwen3-0.6B shapes). On by default for caches in the model's dtype: L1's
batch-1 and batch-8 steps 1.4% faster on an H200 (`loadtest/results/fused-decode-h200-2026-12-05-a047c14/`).
An fp8 cache keeps the two launches: the fused path's fp8 read-back is checked on CPU only.
WEIR_FUSED_DECODE_ATTENTION=0 turns it off (read when the layer is built).

A layer may attend over a sliding window (`sliding_window` W: a query at position p sees keys
p - W + 1 .. p, transformers' convention) and cap its scores (`logit_softcap` c: c * tanh(s / c)
before the softmax, Gemma 2); every kernel path takes both (None: off, the kernels compiled without).
The kernels never load a key before their first query's window: where every layer has the same
window, the KV cache manager releases the blocks before it (engine/core/sliding_window.py) and the
table's entries there name blocks that may hold anything.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.layers.attention_backend import AttentionBackend
from engine.worker.attention_metadata import AttentionMetadata, get_attention_metadata
from engine.worker.fresh_prompts import FreshPromptTail
from ops.env_flags import env_flag


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
        total_num_kv_heads: int | None = None,
        kv_head_offset: int = 0,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.attn_backend = attn_backend
        self.prefix = prefix
        # not over an fp8 cache: its fused read-back has not run on a GPU yet (module docstring)
        self.fused_decode = (
            env_flag("WEIR_FUSED_DECODE_ATTENTION") and attn_backend.kv_cache_dtype.itemsize != 1
        )
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None
        self.total_num_kv_heads = total_num_kv_heads or num_kv_heads
        self.kv_head_offset = kv_head_offset
        # cache value * k_scale[h] = key of KV head h (fp8 caches); not in the state dict: not weights
        self.k_scale: torch.Tensor | None
        self.v_scale: torch.Tensor | None
        if attn_backend.kv_cache_dtype.itemsize == 1:
            self.register_buffer("k_scale", torch.ones(num_kv_heads, dtype=torch.float32), persistent=False)
            self.register_buffer("v_scale", torch.ones(num_kv_heads, dtype=torch.float32), persistent=False)
        else:
            self.k_scale = self.v_scale = None

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        positions: torch.Tensor
        | None = None,  # [num_tokens] int64: rotate q and k first (with the cache below)
        cos_sin_cache: torch.Tensor | None = None,  # [max_position, rotary_dim] (RotaryEmbedding's)
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        """Store this step's K/V in the cache, then attend. Given positions and the rotary cos/sin cache,
        q and k are rotated by the same launch that stores K/V (ops rotary_and_write_kv): one kernel
        per layer fewer than rotating first, which at batch 1 is launch time saved, not bytes. A decode
        batch (one token a sequence) may rotate, store and attend in one launch (`fused_decode`)."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError(f"attention layer {self.layer_idx} has no KV cache bound")
        md = get_attention_metadata()
        backend = self.attn_backend
        num_tokens = query.shape[0]
        tail = md.fresh_prompts
        if (
            tail is not None
            and backend.flash_prefill is not None
            and self.logit_softcap is None
            and tail.num_tokens >= backend.flash_prefill_min_tokens
        ):
            return self._attend_fresh_prompts_apart(query, key, value, positions, cos_sin_cache, md, tail)
        if positions is not None:
            assert cos_sin_cache is not None
            if md.max_query_len == 1 and self.fused_decode:
                out = backend.kernels.decode_attention(
                    positions, query, key, value, cos_sin_cache, self.head_dim, self.k_cache, self.v_cache,
                    md.slot_mapping, md.block_tables, md.seq_lens, md.query_start_loc, md.max_seq_len,
                    self.scale, self.k_scale, self.v_scale, self.sliding_window, self.logit_softcap,
                )  # fmt: skip
                return out.view(num_tokens, self.num_heads * self.head_dim)
            query = backend.kernels.rotary_and_write_kv(
                positions, query, key, value, cos_sin_cache, self.head_dim, self.k_cache, self.v_cache,
                md.slot_mapping, self.k_scale, self.v_scale,
            )  # fmt: skip
        else:
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
            self.sliding_window,
            self.logit_softcap,
        )
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _attend_fresh_prompts_apart(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        positions: torch.Tensor | None,  # [num_tokens] int64, or None: q and k come rotated
        cos_sin_cache: torch.Tensor | None,
        md: AttentionMetadata,
        tail: FreshPromptTail,  # md.fresh_prompts
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        """The step's tail of whole prompts (no cached context) attended by the backend's flash function
        over their own rotated keys, the rows before it by the paged kernel. K/V are stored first, as on
        the paged path; rotary and the store are two launches here, since flash needs the rotated keys
        outside the cache."""
        backend = self.attn_backend
        n, d = query.shape[0], self.head_dim
        if positions is not None:
            assert cos_sin_cache is not None
            query, key = backend.kernels.rotary_embedding(positions, query, key, cos_sin_cache, d)
        q = query.view(n, self.num_heads, d)
        k = key.view(n, self.num_kv_heads, d)
        v = value.view(n, self.num_kv_heads, d)
        backend.write_kv_cache(k, v, self.k_cache, self.v_cache, md.slot_mapping, self.k_scale, self.v_scale)
        flash = backend.flash_prefill
        assert flash is not None
        cu_seqlens = tail.cu_seqlens(md.query_start_loc)
        t0, s0 = tail.token_start, tail.seq_start
        if t0 == 0:  # a step of fresh prompts only
            out = flash(q, k, v, cu_seqlens, tail.max_len, self.scale, self.sliding_window)
            return out.view(n, self.num_heads * d)
        out = torch.empty_like(q)  # [n, num_heads, head_dim]
        out[:t0] = backend.paged_attention(
            q[:t0], self.k_cache, self.v_cache, md.block_tables[:s0], md.seq_lens[:s0],
            md.query_start_loc[: s0 + 1], tail.head_max_query_len, tail.head_max_seq_len, self.scale,
            self.k_scale, self.v_scale, self.sliding_window, self.logit_softcap,
        )  # fmt: skip
        flash(q[t0:], k[t0:], v[t0:], cu_seqlens, tail.max_len, self.scale, self.sliding_window, out=out[t0:])
        return out.view(n, self.num_heads * d)
