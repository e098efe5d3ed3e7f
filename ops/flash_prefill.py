"""Whole prompts' attention through torch's flash attention (FlashAttention-2's varlen kernel).

A prompt with no cached context attends only to its own keys, which the step has in hand
contiguously (the qkv projection's output, rotated): it needs no paged read. On T2's 8 x 1,024-token
prefill steps weir's paged Triton kernel runs at ~260 TFLOP/s against flash's ~520 on one long prompt
(H200, README Performance); torch ships FlashAttention-2 on CUDA, so this path hands such prompts to it
(`flash_varlen_attention`), and the layer (engine.model.layers.attention) keeps its paged kernel for
the rest of the step: decodes, later chunks of a prompt, prompts that hit the prefix cache.

The spec is ops.reference.varlen_causal_attention. Flash's paged mode needs pages of 256 tokens
(weir's are 8-64), so it is not used for cached context. Not for fp8 caches (the paged kernel reads
keys rounded to fp8; flash would attend over the unrounded ones) nor softcapped scores (no softcap
argument in torch's op).
"""

from __future__ import annotations

import torch

# torch's flash build takes head sizes up to 256 that are multiples of 8, in fp16 and bf16.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


def flash_prefill_unsupported(
    device: torch.device,
    dtype: torch.dtype,
    kv_cache_dtype: torch.dtype,
    head_dim: int,
    softcap: float | None,
) -> str | None:
    """Why a layer cannot take the flash path (None: it can)."""
    if device.type != "cuda":
        return f"device {device.type} (flash attention runs on CUDA)"
    if dtype not in _FLASH_DTYPES:
        return f"dtype {dtype} (flash takes float16 and bfloat16)"
    if kv_cache_dtype != dtype:
        return f"kv_cache_dtype {kv_cache_dtype} (the paged kernel reads keys rounded to it)"
    if head_dim % 8 or head_dim > _MAX_HEAD_DIM:
        return f"head_dim {head_dim} (flash takes multiples of 8 up to {_MAX_HEAD_DIM})"
    if softcap is not None:
        return "a logit softcap (torch's flash op takes none)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "a GPU older than Ampere (no FlashAttention-2)"
    return None


# The op that writes into a given output exists in recent torch only; without it the flash result is
# a new tensor, which the layer copies into its output when the step also has paged rows.
_FLASH_INPLACE = getattr(torch.ops.aten, "_flash_attention_forward_no_dropout_inplace", None)


def writes_in_place() -> bool:
    """Whether `flash_varlen_attention(out=...)` writes `out` itself (else it returns a new tensor)."""
    return _FLASH_INPLACE is not None


def flash_varlen_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cu_seqlens: torch.Tensor,  # [num_seqs + 1] int32
    max_len: int,
    scale: float,
    sliding_window: int | None = None,  # keys q_pos - window < k_pos <= q_pos only; None = all
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    """ops.reference.varlen_causal_attention on FlashAttention-2 (GQA natively: fewer KV heads than
    query heads). Returns `out` when it was written in place, else a new tensor."""
    # flash's window (left, right) admits keys i - left .. i + right: W keys up to the query's own.
    left = -1 if sliding_window is None else sliding_window - 1
    args = (query, key, value, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False)
    if out is not None and _FLASH_INPLACE is not None:
        _FLASH_INPLACE(out, *args, scale=scale, window_size_left=left, window_size_right=0)
        return out
    result = torch.ops.aten._flash_attention_forward(
        *args, scale=scale, window_size_left=left, window_size_right=0
    )[0]
    if out is not None:
        out.copy_(result)
        return out
    return result
