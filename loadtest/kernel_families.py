"""Kernel (or CPU operator) name -> family, shared by the kernel profiles (profile_kernels, decode_breakdown)."""

from __future__ import annotations

# Kernel (or CPU operator) name fragments -> family; the first match wins, so order matters.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lora", ("lora_shrink", "lora_expand", "segment_shrink", "segment_expand")),
    ("attention", ("paged_attention", "reduce_segments", "attn", "sdpa", "flash")),
    ("kv_write", ("write_kv_cache", "kv_cache")),
    ("norm", ("rms_norm", "rmsnorm", "layer_norm")),
    ("rotary", ("rotary", "rope")),
    ("activation", ("silu",)),
    ("sampler", ("sort", "topk", "softmax", "argmax", "multinomial", "exponential", "cumsum", "gather")),
    # "gemv": weir's Triton decode GEMVs (W4A16, W8A16 / FP8, the float GEMV, with a LoRA epilogue too)
    (
        "matmul",
        ("gemm", "gemv", "cutlass", "nvjet", "sm90", "cublas", "aten::mm", "aten::addmm", "matmul", "linear"),
    ),
    ("copies", ("memcpy", "memset", "copy", "cat", "index")),
)


def family_of(name: str) -> str:
    low = name.lower()
    for family, fragments in FAMILIES:
        if any(f in low for f in fragments):
            return family
    return "other"
