"""Kernels. `ops.reference` is the spec (plain torch); `ops.triton` holds Triton kernels with the same
signatures. The model calls the functions exported here; `use_triton()` is the one place that picks.
"""

from __future__ import annotations

from ops import reference

_USE_TRITON = False


def use_triton(enabled: bool) -> None:
    """Route every op to its Triton kernel (GPU) or to the torch reference (CPU, and the default)."""
    global _USE_TRITON, rms_norm, rotary_embedding, silu_and_mul, write_kv_cache, paged_attention
    _USE_TRITON = enabled
    impl = reference
    if enabled:
        from ops import triton as impl  # noqa: PLC0415  (imported lazily: triton needs a GPU or the interpreter)
    rms_norm = impl.rms_norm
    rotary_embedding = impl.rotary_embedding
    silu_and_mul = impl.silu_and_mul
    write_kv_cache = impl.write_kv_cache
    paged_attention = impl.paged_attention


def triton_enabled() -> bool:
    return _USE_TRITON


rms_norm = reference.rms_norm
rotary_embedding = reference.rotary_embedding
silu_and_mul = reference.silu_and_mul
write_kv_cache = reference.write_kv_cache
paged_attention = reference.paged_attention
