"""What every layer of one model is built with, chosen once by the model runner.

A model class takes `(config, ctx, prefix)`: `config` describes the checkpoint (ModelConfig), `ctx`
the engine's choices for it, `prefix` the model's dotted name (empty at the top). Model files unpack
`ctx` into the layers' explicit arguments and extend `prefix` with each child's attribute name, so a
layer's prefix is its parameter names' prefix (`model.layers.0.self_attn.qkv_proj`).

Frozen: nothing downstream re-decides what the runner chose. Later features (LoRA, tensor-parallel
groups) add their fields here rather than new constructor arguments through every model class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.layers.attention_backend import AttentionBackend, TorchAttentionBackend
from engine.model.quantization import QuantizationConfig
from ops import Kernels


@dataclass(frozen=True, slots=True)
class BuildContext:
    dtype: torch.dtype = torch.float32  # parameters and activations
    quant_config: QuantizationConfig | None = None  # None: every linear layer unquantized
    # None: the torch reference backend with the KV cache in `dtype` (tests that build a model alone).
    attn_backend: AttentionBackend | None = None
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if self.attn_backend is None:  # resolved once, here: every layer then shares this object
            object.__setattr__(self, "attn_backend", TorchAttentionBackend(self.dtype))

    @property
    def backend(self) -> AttentionBackend:
        assert self.attn_backend is not None  # set by __post_init__
        return self.attn_backend

    @property
    def kernels(self) -> Kernels:
        """The op implementations that go with the attention backend (norm, rotary, activation)."""
        return self.backend.kernels

    def linear_args(self) -> dict:
        """The keyword arguments every parallel linear layer of a model takes from this context."""
        return dict(
            params_dtype=self.dtype,
            quant_config=self.quant_config,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
        )


def join_prefix(prefix: str, name: str) -> str:
    """`model.layers.0` + `self_attn` -> `model.layers.0.self_attn` (no leading dot at the top)."""
    return f"{prefix}.{name}" if prefix else name
