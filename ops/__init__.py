"""Kernels. `ops.reference` is the spec (plain torch); `ops.triton` holds Triton kernels with the same
signatures.

Nothing here is global or switchable. A `Kernels` value is one implementation of every op; the model
runner picks one once (through the attention backend, engine.model.layers.attention_backend) and the
layers that call an op hold it. Two engines in one process can run different kernels, and a test
picks the Triton kernels by asking for them (`triton_kernels()`), not by flipping a switch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ops import reference

OP_NAMES = (
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv_cache",
    "rotary_and_write_kv",
    "paged_attention",
    "decode_attention",
    "lora_shrink",
    "lora_expand",
    "seeded_exponential_",
    "sample_argmax",
    "rms_norm_fp8",
    "silu_and_mul_fp8",
    "fused_moe",
    "gemma_rms_norm",
    "gelu_tanh_and_mul",
)


@dataclass(frozen=True, slots=True)
class Kernels:
    """One implementation of every op, each with the signature of its `ops.reference` function.

    Plain function attributes, so a layer's call costs one attribute lookup, as a module-level
    `ops.rms_norm` did.
    """

    name: str  # "torch" or "triton"
    rms_norm: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    silu_and_mul: Callable[..., Any]
    write_kv_cache: Callable[..., Any]
    rotary_and_write_kv: Callable[..., Any]  # rotary_embedding, then write_kv_cache: one launch
    paged_attention: Callable[..., Any]
    # rotary_and_write_kv, then paged_attention: one launch (decode batches only)
    decode_attention: Callable[..., Any]
    lora_shrink: Callable[..., Any]  # batched LoRA over stacked adapter slots (engine.lora)
    lora_expand: Callable[..., Any]
    seeded_exponential_: Callable[..., Any]  # the sampling noise of seeded rows (engine.worker.sampler)
    sample_argmax: Callable[..., Any]  # the sampler's draw (argmax of logits - log noise) or greedy argmax
    rms_norm_fp8: Callable[..., Any]  # rms_norm quantized per token for a W8A8 linear (fp8_activation)
    silu_and_mul_fp8: Callable[..., Any]  # silu_and_mul likewise
    fused_moe: Callable[
        ..., Any
    ]  # the mixture-of-experts MLP of routed tokens (engine.model.layers.fused_moe)
    gemma_rms_norm: Callable[..., Any]  # RMSNorm scaling by (1 + weight) in float32 (Gemma)
    gelu_tanh_and_mul: Callable[..., Any]  # GeGLU with the tanh-approximate GELU (Gemma)

    @classmethod
    def from_module(cls, name: str, module: ModuleType) -> Kernels:
        return cls(name, *(getattr(module, op) for op in OP_NAMES))


TORCH_KERNELS = Kernels.from_module("torch", reference)


def triton_kernels() -> Kernels:
    """The Triton kernels. Raises ImportError where triton cannot run (no GPU and TRITON_INTERPRET unset
    before triton was first imported, or triton missing)."""
    from ops import triton as impl  # noqa: PLC0415  (lazy: importing triton needs a GPU or the interpreter)

    return Kernels.from_module("triton", impl)
