"""Plain-torch reference implementations of every op: the spec each Triton kernel is tested against.

These also run the model on CPU. They favour clarity over speed; the Triton kernels in ops/triton/
keep exactly these signatures.

KV cache layout (one tensor each for K and V, per layer):
    [num_blocks, block_size, num_kv_heads, head_dim]
A token's slot is `block_id * block_size + offset`; slot -1 means "do not write" (padding).

FP8 KV caches (float8_e4m3fn / float8_e5m2; engine.model.kv_cache_dtype): the write stores head h
of a token as fp8(clamp(x * (1 / k_scale[h]), -max, max)), rounded to nearest even, and attention
reads cache * k_scale[h] (likewise V with v_scale). The scales are float32 device tensors of shape
[num_kv_heads], fixed at load (a per-tensor scale is the same value in every entry), so a CUDA graph
replays them without a host value baked in. None (a cache in the model's dtype) scales nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ops.moe_quant import IntExpertScales

if TYPE_CHECKING:
    from ops.moe_quant import Fp8ExpertScales


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with `residual`, first adds it and also returns the sum (the next residual).

    Computed in float32 and cast back, as transformers' Llama does.
    """
    orig_dtype = x.dtype
    h = x.float()
    if residual is not None:
        h = h + residual.float()
        new_residual = h.to(orig_dtype)
    variance = h.pow(2).mean(dim=-1, keepdim=True)
    out = (h * torch.rsqrt(variance + eps)).to(orig_dtype) * weight
    if residual is not None:
        return out, new_residual
    return out


def gemma_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]: the checkpoint's, scaling by (1 + weight)
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + weight), in float32 and rounded once at the
    end (transformers' Gemma2/Gemma3RMSNorm; Llama's rounds before the weight). With `residual`, first
    adds it in x's dtype (the model's `residual + hidden`) and also returns that sum."""
    orig_dtype = x.dtype
    if residual is not None:
        x = x + residual
    h = x.float()
    variance = h.pow(2).mean(dim=-1, keepdim=True)
    out = (h * torch.rsqrt(variance + eps) * (1.0 + weight.float())).to(orig_dtype)
    if residual is not None:
        return out, x
    return out


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos in the first half, sin in the second
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (rotate the two halves), as Llama/Mistral/Qwen/Phi-3 use.

    The cache's width is the rotary_dim: the first rotary_dim dims of each head rotate (their two
    halves paired), the rest pass through unchanged (Phi-3's partial_rotary_factor). Returns new
    tensors of the input shapes and dtypes (computed in float32).
    """
    rotary_dim = cos_sin_cache.shape[-1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"cos_sin_cache rows must be an even width <= head_dim={head_dim}; got {rotary_dim}")
    cos_sin = cos_sin_cache.index_select(0, positions)  # [num_tokens, rotary_dim]
    cos, sin = cos_sin.chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2] each
    return _rotate(query, cos, sin, head_dim), _rotate(key, cos, sin, head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    num_tokens = x.shape[0]
    orig_dtype = x.dtype
    rotary_dim = 2 * cos.shape[-1]
    x = x.view(num_tokens, -1, head_dim).float()  # [num_tokens, heads, head_dim]
    x_rot, x_pass = (
        x[..., :rotary_dim],
        x[..., rotary_dim:],
    )  # pass: [num_tokens, heads, head_dim - rotary_dim]
    x1, x2 = x_rot.chunk(2, dim=-1)
    cos = cos.float().unsqueeze(1)  # [num_tokens, 1, rotary_dim / 2]
    sin = sin.float().unsqueeze(1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass), dim=-1)
    return out.reshape(num_tokens, -1).to(orig_dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] holding [gate | up]; returns silu(gate) * up: [num_tokens, d]."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] holding [gate | up]; returns gelu(gate) * up: [num_tokens, d], GELU's tanh
    approximation (transformers' `gelu_pytorch_tanh`, Gemma's GeGLU), in x's dtype as transformers."""
    d = x.shape[-1] // 2
    return torch.nn.functional.gelu(x[..., :d], approximate="tanh") * x[..., d:]


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip (padding)
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32; None = 1.0
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] float32; None = 1.0
) -> None:
    """Scatter this step's K/V into their cache slots, in place (quantized with each head's scale when
    the cache is fp8; a cache in the model's dtype ignores the scales)."""
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = _to_cache(key[valid], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = _to_cache(value[valid], v_cache.dtype, v_scale)


def rotary_and_write_kv(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos in the first half, sin in the second
    head_dim: int,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip (padding)
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32; None = 1.0
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
    """rotary_embedding on q and k, then write_kv_cache of the rotated k and v; returns the rotated q
    (the rotated k lives only in the cache, where attention reads keys)."""
    q, k = rotary_embedding(positions, query, key, cos_sin_cache, head_dim)
    n = k.shape[0]
    write_kv_cache(
        k.view(n, -1, head_dim),
        value.reshape(n, -1, head_dim),
        k_cache,
        v_cache,
        slot_mapping,
        k_scale,
        v_scale,
    )
    return q


def _to_cache(
    x: torch.Tensor,  # [n, num_kv_heads, head_dim]
    cache_dtype: torch.dtype,
    scale: torch.Tensor | None,  # [num_kv_heads] float32
) -> torch.Tensor:
    if cache_dtype.itemsize != 1:
        return x.to(cache_dtype)
    # Clamped first: torch's cast is not saturating (e4m3fn has no inf; out of range becomes NaN).
    # x times the float32 reciprocal (IEEE-rounded, as the Triton kernel's div_rn), not x / scale:
    # both sides multiply by the same float32 value, so their bytes agree.
    fp8_max = torch.finfo(cache_dtype).max
    x = x.float()
    if scale is not None:
        x = x * (1.0 / scale)[:, None]  # [n, num_kv_heads, head_dim]
    return x.clamp(-fp8_max, fp8_max).to(cache_dtype)


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32; unused entries arbitrary
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: cumulative query lengths
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32 (fp8 caches); None = 1.0
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] float32 (fp8 caches); None = 1.0
    sliding_window: int | None = None,  # keys q_pos - window < k_pos <= q_pos only; None = all
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap) before the softmax
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context.

    The K/V of this step's tokens must already be written to the cache. Query token i of a sequence
    with q_len new tokens and seq_len context sits at position seq_len - q_len + i and attends to
    positions 0..that position. Handles mixed batches: prefill chunks (q_len > 1, with cached
    prefix) and decodes (q_len == 1). GQA: query head h reads KV head h // (num_heads / num_kv_heads).
    An fp8 cache's KV head h is read as cache * k_scale[h] (V: * v_scale[h]). Returns [num_tokens, num_heads, head_dim]
    in the query's dtype.

    With `sliding_window` W a query at position p sees only the W keys p - W + 1 .. p (transformers'
    masking_utils: kv_idx > q_idx - W), and the blocks wholly before the first query's window are not
    read at all: the KV cache manager may have released them (their table entries name any block;
    engine/core/sliding_window.py). With `softcap` c the scaled scores s become c * tanh(s / c)
    before the mask and the softmax (Gemma 2's attn_logit_softcapping).
    """
    del max_query_len, max_seq_len  # the kernels use them for grid sizing; the reference does not
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        # Keys from `first_key` on: a window's first block on (its own keys before the window masked).
        first_block = 0
        if sliding_window is not None:
            first_block = max(seq_len - q_len - sliding_window + 1, 0) // block_size
        first_key = first_block * block_size
        blocks = block_tables[i, first_block:num_blocks].long()
        # [seq_len - first_key, kv_heads, d]
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[: seq_len - first_key].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[: seq_len - first_key].float()
        if k_scale is not None:  # an fp8 cache's scales, one per KV head
            k = k * k_scale[:, None]
        if v_scale is not None:
            v = v * v_scale[:, None]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, seq_len - first_key, d]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[q_start:q_end].float().transpose(0, 1)  # [heads, q_len, d]
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [heads, q_len, seq_len - first_key]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device).unsqueeze(1)
        k_pos = torch.arange(first_key, seq_len, device=query.device).unsqueeze(0)
        hidden = k_pos > q_pos  # [q_len, seq_len - first_key]
        if sliding_window is not None:
            hidden |= k_pos <= q_pos - sliding_window
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return out


def varlen_causal_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cu_seqlens: torch.Tensor,  # [num_seqs + 1] int32: cumulative lengths (0, n0, n0+n1, ...)
    max_len: int,
    scale: float,
    sliding_window: int | None = None,  # keys q_pos - window < k_pos <= q_pos only; None = all
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]: written in place when given
) -> torch.Tensor:
    """Causal attention of whole prompts over their own keys, given contiguously (no cache, no cached
    context): sequence s is rows cu_seqlens[s]..cu_seqlens[s + 1] of each tensor. The spec of
    ops.flash_prefill's flash path; the same masking as paged_attention of a prompt with no context.
    Returns `out` (a new tensor if None) in the query's dtype."""
    del max_len  # flash sizes its grid with it; the reference does not
    group = query.shape[1] // key.shape[1]
    if out is None:
        out = torch.empty_like(query)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        n = end - start
        if n == 0:
            continue
        q = query[start:end].float().transpose(0, 1)  # [heads, n, d]
        k = key[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, n, d]
        v = value[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [heads, n, n]
        pos = torch.arange(n, device=query.device)
        hidden = pos.unsqueeze(0) > pos.unsqueeze(1)  # [n (query), n (key)]
        if sliding_window is not None:
            hidden |= pos.unsqueeze(0) <= pos.unsqueeze(1) - sliding_window
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        out[start:end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return out


def decode_attention(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_dim], not rotated yet
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim], not rotated yet
    value: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos in the first half, sin in the second
    head_dim: int,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip (padding)
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, including this step's token
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: one token a sequence
    max_seq_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32 (fp8 caches); None = 1.0
    v_scale: torch.Tensor | None = None,
    sliding_window: int | None = None,  # as paged_attention's
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """A decode batch's attention (one new token a sequence): rotary_and_write_kv, then paged_attention."""
    q = rotary_and_write_kv(
        positions, query, key, value, cos_sin_cache, head_dim, k_cache, v_cache, slot_mapping, k_scale, v_scale,
    )  # fmt: skip
    n = q.shape[0]
    return paged_attention(
        q.view(n, -1, head_dim), k_cache, v_cache, block_tables, seq_lens, query_start_loc, 1, max_seq_len, scale,
        k_scale, v_scale, sliding_window, softcap,
    )  # fmt: skip


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    a_stacked: torch.Tensor,  # [num_slots, lora_dim, in_features]: every adapter slot's A, zero-padded
    token_slots: torch.Tensor,  # [num_tokens] int32: each token's adapter slot; -1 = no adapter
) -> torch.Tensor:
    """The first half of batched LoRA: x @ A[slot]^T per token -> [num_tokens, lora_dim] float32.

    Rows of tokens without an adapter (slot -1) are left at zero; `lora_expand` skips them anyway.
    Fused layers (qkv, gate_up) stack their sub-matrices' A along lora_dim (n_slices * max_rank).
    """
    out = torch.zeros(x.shape[0], a_stacked.shape[1], dtype=torch.float32, device=x.device)
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = token_slots == slot
        out[rows] = x[rows].float() @ a_stacked[slot].float().t()
    return out


def lora_expand(
    t: torch.Tensor,  # [num_tokens, lora_dim] float32: lora_shrink's output
    b_stacked: torch.Tensor,  # [num_slots, out_features, lora_dim]: every slot's B, scaling folded in
    token_slots: torch.Tensor,  # [num_tokens] int32; -1 = no adapter (the row of y is left alone)
    y: torch.Tensor,  # [num_tokens, out_features]: the base layer's output, updated in place
    slice_offsets: Sequence[int] = (0,),  # where each sub-matrix's rows start (the kernel's hint)
) -> torch.Tensor:
    """The second half: y += t @ B[slot]^T per token, in place; returns y.

    `slice_offsets` lets the Triton kernel skip B's zero blocks; the full product here gives the
    same sum, so it is not used.

    `t` is rounded to B's dtype first, as PEFT feeds lora_A's output (in the model dtype) to lora_B.
    Fused layers hold a block-diagonal B: sub-matrix i's output rows read only lora_dim columns
    [i * max_rank, (i + 1) * max_rank), so one product serves every sub-matrix.
    """
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = token_slots == slot
        delta = t[rows].to(b_stacked.dtype).float() @ b_stacked[slot].float().t()
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y


# ---------------------------------------------------------------------------- seeded sampling noise
# Counter-based: the noise of (row key, column) is a pure function of the two, so a seeded row's
# noise never depends on which rows share its batch, and every seeded row of a step is one
# vectorized operation (no per-row torch.Generator). Integers are int64 holding uint32 values, masked
# after every multiply: exact, and every product stays below 2**63 (both multipliers are < 2**31).
_M32 = 0xFFFFFFFF
_CHUNK_ELEMENTS = 1 << 20


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit multiply-xorshift finalizer (Wellons' hash-prospector low-bias constants), in place."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x &= _M32
    x ^= x >> 15
    x *= 0x735A2D97
    x &= _M32
    x ^= x >> 15
    return x


def seeded_row_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [S] int64 in [0, 2**63) -> two 32-bit round keys (k0, k1), [S] int64 each.

    A two-round Feistel-like mix of the key's halves, so (lo, hi) -> (k0, k1) is a bijection (mix is
    invertible) and near keys (a row's consecutive steps differ by 1) get unrelated round keys."""
    lo = keys & _M32
    hi = keys >> 32
    k0 = _mix32_(lo ^ _mix32_(hi ^ 0x9E3779B9))
    k1 = _mix32_(hi ^ _mix32_((k0 + 0x7F4A7C15) & _M32))
    return k0, k1


def seeded_hash(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """keys [S] int64 -> [S, V] int64 uint32 hashes: h(key, c) = mix(mix(c ^ k0) + k1)."""
    k0, k1 = seeded_row_keys(keys)
    cols = torch.arange(vocab_size, dtype=torch.int64, device=keys.device)  # [V]
    x = _mix32_(cols ^ k0[:, None])  # [S, V]
    x += k1[:, None]
    x &= _M32
    return _mix32_(x)


def seeded_uniform(h: torch.Tensor) -> torch.Tensor:
    """uint32 hashes (int64) -> float32 u = ((h >> 9) + 0.5) * 2**-23: the 2**23 midpoints of (0, 1), all
    exact in float32 (with 24 bits the top midpoint would round to 1.0), so -log(u) is in [6e-8, 16.6]."""
    return (h >> 9).to(torch.float32).add_(0.5).mul_(2.0**-23)


def seeded_exponential_(
    noise: torch.Tensor,  # [B, V] float32, updated in place
    rows: torch.Tensor,  # [S] int64: the seeded rows of the batch
    keys: torch.Tensor,  # [S] int64 in [0, 2**63): each row's key (seed and step, engine.worker.sampler)
) -> torch.Tensor:
    """noise[rows[s], c] = -log(seeded_uniform(seeded_hash(keys)[s, c])), Exponential(1) noise that is
    finite and > 0; returns noise."""
    vocab_size = noise.shape[1]
    # On CPU a few rows at a time: each of the hash's ~20 integer passes then stays in cache (one pass
    # over 256 x 128k int64 values streams 256 MB; chunked, the hash is ~6x faster). Elsewhere at once.
    step = max(1, _CHUNK_ELEMENTS // vocab_size) if noise.device.type == "cpu" else max(rows.numel(), 1)
    for a in range(0, rows.numel(), step):
        h = seeded_hash(keys[a : a + step], vocab_size)  # [s, V]
        noise.index_copy_(0, rows[a : a + step], seeded_uniform(h).log_().neg_())
    return noise


def sample_argmax(
    logits: torch.Tensor,  # [B, V] float32
    noise: torch.Tensor | None,  # [B, V] float32 Exponential(1) draws, or None (greedy)
) -> torch.Tensor:  # [B] int64
    """Per row, the index of the largest logits - log(max(noise, tiny)); of logits alone without noise.
    With Exponential(1) noise this samples softmax(logits): argmax p / E = argmax log p - log E, and
    log p differs from the logits by one constant per row (the exponential race, without a softmax).
    The clamp to float32's smallest normal keeps a draw of exactly 0 finite. Ties: the first index."""
    if noise is None:
        return logits.argmax(dim=-1)
    return (logits - noise.clamp_min(torch.finfo(torch.float32).tiny).log()).argmax(dim=-1)


# float32(1 / 448) as a Python float: a float32 tensor times it is times float32(1 / 448), with no tensor
# to copy to the device (a copy that CUDA graph capture refuses)
_INV_FP8_MAX = float(torch.tensor(1.0) / torch.tensor(448.0))


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn, scales [M, 1] float32): scale = max(amax |x[m]|, 1e-12) times
    float32(1 / 448) (as torch on CUDA divides by a scalar), q = fp8(x * (1 / scale)), saturating."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) * _INV_FP8_MAX
    q = (x.float() * scale.reciprocal()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale


def rms_norm_fp8(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, ...]:
    """(q, scales[, the new residual]): `rms_norm` quantized per token for a W8A8 linear."""
    if residual is None:
        return per_token_fp8(rms_norm(x, weight, eps))
    out, new_residual = rms_norm(x, weight, eps, residual)
    return (*per_token_fp8(out), new_residual)


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): `silu_and_mul` quantized per token for a W8A8 linear."""
    return per_token_fp8(silu_and_mul(x))


def moe_route(
    logits: torch.Tensor,  # [num_tokens, num_experts] in the model dtype
    top_k: int,
    renormalize: bool,
    softmax_after_topk: bool = False,
    round_to: torch.dtype | None = None,  # the weights rounded through this dtype (None: float32 as is)
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [num_tokens, top_k] float32, ids [num_tokens, top_k] int64
    """A router's weights and experts as transformers computes them: softmax over all experts in float32,
    top_k, the k divided by their sum (`renormalize`); GraniteMoe (`softmax_after_topk`) takes the top_k
    logits first and softmaxes those; Qwen rounds the weights through the model dtype (`round_to`)."""
    if softmax_after_topk:
        topk_logits, topk_ids = torch.topk(logits.float(), top_k, dim=-1)
        topk_weights = torch.softmax(topk_logits, dim=-1)
    else:
        probs = torch.softmax(logits.float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    if round_to is not None:
        topk_weights = topk_weights.to(round_to).float()
    return topk_weights, topk_ids


def fused_moe(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]: each expert's [gate; up]
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]: each expert's down projection
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32: the routing weights
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int: the chosen experts
    quant: Fp8ExpertScales | IntExpertScales | None = None,  # quantized w13 / w2 (ops.moe_quant)
) -> torch.Tensor:  # [num_tokens, hidden] in hidden's dtype
    """A mixture-of-experts MLP: sum over k of topk_weights[t, k] * expert_{topk_ids[t, k]}(x_t), where
    expert_e(x) = down_e(silu(gate_e x) * up_e x).

    The rounding steps are the Triton kernel's: [gate | up] rounded to x's dtype, the SiLU-mul computed
    in float32 and rounded, the down projection rounded, times the weight in float32 and rounded once
    more (one row per (token, k) pair), then the top_k rows summed in float32 and rounded. In float32
    every rounding is exact, so this is transformers' per-expert loop up to summation order.

    Quantized experts: the weights dequantized to x's dtype first (`dequantize_fp8_experts`,
    `dequantize_int_experts`), then the same; with static FP8 input scales each GEMM's input goes
    through `fp8_qdq` (x before [gate; up], the rounded SiLU-mul before down).
    """
    num_tokens, top_k = topk_ids.shape
    dtype = hidden.dtype
    a2_scale = None
    if isinstance(quant, IntExpertScales):
        w13 = dequantize_int_experts(w13, quant.w13_zeros, quant.w13_scales, quant.bits, dtype)
        w2 = dequantize_int_experts(w2, quant.w2_zeros, quant.w2_scales, quant.bits, dtype)
    elif quant is not None:
        w13 = dequantize_fp8_experts(w13, quant.w13, quant.block_shape, dtype)
        w2 = dequantize_fp8_experts(w2, quant.w2, quant.block_shape, dtype)
        if quant.a13 is not None:
            hidden = fp8_qdq(hidden, quant.a13)
        a2_scale = quant.a2
    per_pair = torch.zeros(num_tokens, top_k, hidden.shape[1], dtype=dtype, device=hidden.device)
    for expert in topk_ids.unique().tolist():  # experts that got no token cost nothing
        rows, slots = torch.where(topk_ids == expert)
        x = hidden[rows]  # [n, hidden]
        if isinstance(quant, IntExpertScales) and quant.w13_perm is not None:  # act order: w13's columns
            x = x[:, quant.w13_perm[expert].long()]
        gate_up = x @ w13[expert].t()  # [n, 2 * intermediate]
        act = silu_and_mul(gate_up.float()).to(dtype)  # [n, intermediate]
        if a2_scale is not None:
            act = fp8_qdq(act, a2_scale)
        down = (act @ w2[expert].t()).float()  # [n, hidden]
        per_pair[rows, slots] = (down * topk_weights[rows, slots, None].float()).to(dtype)
    return per_pair.float().sum(dim=1).to(dtype)


def dequantize_fp8_experts(
    w: torch.Tensor,  # [E, N, K] float8_e4m3fn
    scale: torch.Tensor,  # [E, N, 1] per channel, or [E, ceil(N / bn), ceil(K / bk)] float32
    block_shape: tuple[int, int] | None,  # (bn, bk); None: per channel
    dtype: torch.dtype,
) -> torch.Tensor:  # [E, N, K] in dtype
    """w * scale in float32 (each scale over its block), rounded once to dtype."""
    if block_shape is not None:
        bn, bk = block_shape
        n, k = w.shape[1], w.shape[2]
        scale = scale.repeat_interleave(bn, 1)[:, :n].repeat_interleave(bk, 2)[:, :, :k]  # [E, N, K]
    return (w.float() * scale).to(dtype)


def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x as an FP8 GEMM with the static input scale `scale` ([1] float32) reads it: fp8(x / s) * s,
    saturating at +-448, back in x's dtype."""
    q = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def unpack_int_experts(w: torch.Tensor, bits: int) -> torch.Tensor:
    """[E, N, K / pf] int32 words -> [E, N, K] int64 codes in [0, 2**bits), the first in the lowest bits."""
    shifts = torch.arange(0, 32, bits, device=w.device, dtype=torch.int64)  # [pf]
    codes = (w.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [E, N, K / pf, pf]
    return codes.flatten(2)


def dequantize_int_experts(
    w: torch.Tensor,  # [E, N, K / pf] int32
    zeros: torch.Tensor,  # [E, N, G] float32
    scales: torch.Tensor,  # [E, N, G] float32
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [E, N, K] in dtype
    """(code - zero) * scale per group of K / G columns, in float32, rounded once to dtype."""
    codes = unpack_int_experts(w, bits).float()  # [E, N, K]
    group = codes.shape[2] // scales.shape[2]
    full_z = zeros.repeat_interleave(group, 2)
    full_s = scales.repeat_interleave(group, 2)
    return ((codes - full_z) * full_s).to(dtype)
