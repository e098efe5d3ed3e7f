"""Attention backends: how an Attention layer stores K/V and attends, chosen once per engine.

`get_attention_backend(device, dtype, kv_cache_dtype, head_size, block_size)` picks one; the model
runner calls it once in `load_model`, builds the model with it (every `Attention` layer holds the same
object) and allocates the KV cache in the shape and dtype the backend asks for. There is no
process-global switch: two engines in one process may use different backends, and a test that wants
the Triton kernels asks for them (`use_triton=True`, or `TritonAttentionBackend(...)`).

Backends:
- `TorchAttentionBackend`: the plain-torch reference ops (ops.reference): CPU, and the fallback on a
  GPU where Triton is missing or the head size is one the Triton kernels do not handle (they take a
  multiple of 8 from 16 to 256, Phi-3's 96 included, or a power of two >= 16: ops/head_dims.py).
- `TritonAttentionBackend`: the Triton kernels (ops.triton): CUDA, or CPU under TRITON_INTERPRET=1.

The KV cache dtype is the model's or an fp8 format (float8_e4m3fn, float8_e5m2): both backends'
kernels quantize on write and dequantize on read (ops/reference.py). The Triton kernels' e4m3
conversions need an Ada/Hopper/Blackwell GPU (compute capability 8.9+; Triton has no e4m3 on older
cards): there an e4m3 cache is refused at start, naming kv_cache_dtype, rather than run slowly.

A backend also carries `kernels`, the implementation of the model's other ops (RMSNorm, rotary,
SiLU-and-mul) that goes with it, so the whole model follows the one choice.

Hot path: the kernel functions are plain attributes, so `Attention.forward` costs one attribute
lookup per op, as the module-level `ops.paged_attention` it replaces did; no method call in between.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import ClassVar

import torch

import ops
from ops import Kernels
from ops.env_flags import env_flag
from ops.flash_prefill import flash_prefill_unsupported, flash_varlen_attention
from ops.head_dims import SUPPORTED_HEAD_DIMS, supports_head_dim

# The fp8 KV-cache formats (EngineConfig.kv_cache_dtype fp8 / fp8_e4m3, fp8_e5m2)
FP8_KV_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Fewer prompt tokens than this in a step's tail stay on the paged kernel: the flash path costs two
# launches more a layer (rotary and the KV write apart), which only long prompts repay.
FLASH_PREFILL_MIN_TOKENS = 256

logger = logging.getLogger("weir.engine")


class AttentionBackend:
    """Base: the KV cache layout, its dtype, and the two attention kernels.

    `write_kv_cache(key, value, k_cache, v_cache, slot_mapping)` and
    `paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
    max_seq_len, scale)` have the signatures of their ops.reference functions.
    """

    name: ClassVar[str] = "base"
    __slots__ = (
        "flash_prefill",
        "flash_prefill_min_tokens",
        "kernels",
        "kv_cache_dtype",
        "paged_attention",
        "write_kv_cache",
    )

    def __init__(self, kernels: Kernels, kv_cache_dtype: torch.dtype) -> None:
        self.kernels = kernels
        self.kv_cache_dtype = kv_cache_dtype
        self.write_kv_cache = kernels.write_kv_cache
        self.paged_attention = kernels.paged_attention
        # Whole prompts without cached context attended by this function instead of the paged kernel
        # (the signature of ops.reference.varlen_causal_attention; engine.worker.fresh_prompts), when an
        # eager step's tail of them holds at least flash_prefill_min_tokens tokens. None: never.
        # `get_attention_backend` sets ops.flash_prefill's where WEIR_FLASH_PREFILL asks and it can run.
        self.flash_prefill: Callable[..., torch.Tensor] | None = None
        self.flash_prefill_min_tokens = FLASH_PREFILL_MIN_TOKENS

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        """Shape of one layer's K cache (and of its V cache)."""
        return (num_blocks, block_size, num_kv_heads, head_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kv_cache_dtype={self.kv_cache_dtype})"


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    __slots__ = ()

    def __init__(self, kv_cache_dtype: torch.dtype) -> None:
        super().__init__(ops.TORCH_KERNELS, kv_cache_dtype)


class TritonAttentionBackend(AttentionBackend):
    """Raises ImportError where triton cannot run (see ops.triton_kernels)."""

    name = "triton"
    __slots__ = ()

    def __init__(self, kv_cache_dtype: torch.dtype) -> None:
        super().__init__(ops.triton_kernels(), kv_cache_dtype)

    @staticmethod
    def supports_head_size(head_size: int) -> bool:
        # The kernels tile a head in one power-of-two block, padding the others (ops/triton/head_dim.py).
        return supports_head_dim(head_size)


def get_attention_backend(
    device: str | torch.device,
    dtype: torch.dtype,
    kv_cache_dtype: torch.dtype,
    head_size: int,
    block_size: int,
    use_triton: bool | None = None,
) -> AttentionBackend:
    """The backend for this engine. `use_triton=None` picks Triton on CUDA when it can run there (a
    warning names why not otherwise) and the torch reference elsewhere; True/False force a choice
    (tests: True on CPU needs TRITON_INTERPRET=1 set before triton's first import)."""
    del block_size  # every block size the engine accepts (8..64) works with both backends
    if kv_cache_dtype != dtype and kv_cache_dtype not in FP8_KV_CACHE_DTYPES:
        # EngineConfig offers only these (kv_cache_dtype auto / fp8*); this guards direct callers.
        raise ValueError(
            f"kv_cache_dtype must be the model dtype {dtype} or an fp8 format; got {kv_cache_dtype}"
        )
    device_type = torch.device(device).type
    if use_triton is None:
        if device_type != "cuda":
            return TorchAttentionBackend(kv_cache_dtype)
        if not TritonAttentionBackend.supports_head_size(head_size):
            logger.warning(
                "head_dim %d is not one the Triton kernels take (%s): running the torch reference ops "
                "on the GPU",
                head_size,
                SUPPORTED_HEAD_DIMS,
            )
            return TorchAttentionBackend(kv_cache_dtype)
        try:
            backend = TritonAttentionBackend(kv_cache_dtype)
        except ImportError as e:
            logger.warning("Triton kernels unavailable (%s); running the torch reference ops on the GPU", e)
            return TorchAttentionBackend(kv_cache_dtype)
        _check_triton_fp8(torch.device(device), kv_cache_dtype)
        _offer_flash_prefill(backend, torch.device(device), dtype, head_size)
        return backend
    if not use_triton:
        return TorchAttentionBackend(kv_cache_dtype)
    if not TritonAttentionBackend.supports_head_size(head_size):
        raise ValueError(
            f"head_dim={head_size} is not supported by the Triton kernels; they take {SUPPORTED_HEAD_DIMS}"
        )
    if device_type == "cuda":
        _check_triton_fp8(torch.device(device), kv_cache_dtype)
    backend = TritonAttentionBackend(kv_cache_dtype)
    _offer_flash_prefill(backend, torch.device(device), dtype, head_size)  # declines off CUDA
    return backend


def _offer_flash_prefill(
    backend: AttentionBackend, device: torch.device, dtype: torch.dtype, head_size: int
) -> None:
    """Give the backend torch's flash attention for whole prompts (ops.flash_prefill) where
    WEIR_FLASH_PREFILL is on and it can run; a layer with a logit softcap still declines it."""
    if not env_flag("WEIR_FLASH_PREFILL"):
        return
    why_not = flash_prefill_unsupported(device, dtype, backend.kv_cache_dtype, head_size, None)
    if why_not is not None:
        logger.info("WEIR_FLASH_PREFILL: prompts stay on the paged kernel: %s", why_not)
        return
    backend.flash_prefill = flash_varlen_attention
    min_tokens = os.environ.get("WEIR_FLASH_PREFILL_MIN_TOKENS", "").strip()
    if min_tokens:  # the GPU checks' tiny prompts take the path too
        if not min_tokens.isdigit() or int(min_tokens) < 1:
            raise ValueError(f"WEIR_FLASH_PREFILL_MIN_TOKENS must be a positive integer; got {min_tokens!r}")
        backend.flash_prefill_min_tokens = int(min_tokens)


def _check_triton_fp8(device: torch.device, kv_cache_dtype: torch.dtype) -> None:
    if kv_cache_dtype != torch.float8_e4m3fn:
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(
            f"kv_cache_dtype fp8_e4m3 needs a GPU of compute capability 8.9+ (Ada, Hopper, Blackwell) for "
            f"the Triton attention kernels; this one is {capability[0]}.{capability[1]}: use fp8_e5m2 or auto"
        )
