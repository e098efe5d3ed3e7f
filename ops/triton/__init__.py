"""Triton kernels with exactly the signatures of `ops.reference` (the spec they are tested against).

Imported lazily by `ops.triton_kernels()`: importing triton needs a GPU or TRITON_INTERPRET=1.
"""

from ops.triton.activation import gelu_tanh_and_mul, silu_and_mul, silu_and_mul_fp8
from ops.triton.fused_moe import fused_moe
from ops.triton.kv_cache import write_kv_cache
from ops.triton.lora import lora_expand, lora_shrink
from ops.triton.paged_attention import decode_attention, paged_attention
from ops.triton.rms_norm import gemma_rms_norm, rms_norm, rms_norm_fp8
from ops.triton.rotary import rotary_embedding
from ops.triton.rotary_kv import rotary_and_write_kv
from ops.triton.sample_argmax import sample_argmax
from ops.triton.seeded_noise import seeded_exponential_

__all__ = [
    "decode_attention",
    "fused_moe",
    "gelu_tanh_and_mul",
    "gemma_rms_norm",
    "lora_expand",
    "lora_shrink",
    "paged_attention",
    "rms_norm",
    "rms_norm_fp8",
    "rotary_and_write_kv",
    "rotary_embedding",
    "sample_argmax",
    "seeded_exponential_",
    "silu_and_mul",
    "silu_and_mul_fp8",
    "write_kv_cache",
]
