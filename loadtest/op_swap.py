"""A built engine's model with some ops back on the torch reference (ops.reference) while active.

The GPU checks use it to tell which kernel moves a result: every op on torch (gpu_family_check.py's
Triton-against-torch comparison on the same weights and cache), or one op at a time
(diagnose_divergence.py). The graph runner is off while active: its graphs hold the kernels as built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ops
from engine.model.layers.attention_backend import AttentionBackend, TorchAttentionBackend

# The ops a model forward calls (the sampler's and LoRA's are not in a plain forward's logits).
MODEL_OPS = (
    "rms_norm",
    "gemma_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_tanh_and_mul",
    "write_kv_cache",
    "rotary_and_write_kv",
    "paged_attention",
    "decode_attention",
    "fused_moe",
)
EVERY_OP = ("attention", *MODEL_OPS)


class OpSwap:
    """`ops_on_torch` (names of ops.Kernels fields, or "attention" for the whole attention backend) on the
    torch reference in every module of `runner`'s model while active, everything else as built."""

    def __init__(self, runner: Any, ops_on_torch: tuple[str, ...] = EVERY_OP) -> None:
        self.runner, self.ops_on_torch = runner, ops_on_torch
        self.undo: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> OpSwap:
        built = self.runner.attn_backend
        on_torch = {op: getattr(ops.TORCH_KERNELS, op) for op in self.ops_on_torch if op != "attention"}
        kernels = dataclasses.replace(built.kernels, **on_torch)
        if "attention" in self.ops_on_torch:
            backend: AttentionBackend = TorchAttentionBackend(built.kv_cache_dtype)
        else:  # the backend as built, over the mixed kernels
            backend = type(built).__new__(type(built))
            AttentionBackend.__init__(backend, kernels, built.kv_cache_dtype)
        for module in self.runner.model.modules():
            for attr, new in (("kernels", kernels), ("attn_backend", backend)):
                if attr in module.__dict__:
                    self.undo.append((module, attr, module.__dict__[attr]))
                    setattr(module, attr, new)
        self.graphs, self.runner.graph_runner = self.runner.graph_runner, None
        return self

    def __exit__(self, *exc: object) -> None:
        for module, attr, old in self.undo:
            setattr(module, attr, old)
        self.undo.clear()
        self.runner.graph_runner = self.graphs
