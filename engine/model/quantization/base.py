"""The quantization seam: a `QuantizationConfig` picks a method for each layer, by layer and prefix.

- `QuantizationConfig.get_linear_method(layer, prefix)` is called once by every linear layer
  (engine.model.layers.linear) while it is built, after its partition sizes are known. `prefix` is the
  layer's dotted name in the model (`model.layers.0.self_attn.qkv_proj`): fused layers carry the fused
  name, and the model's `packed_modules_mapping` names the checkpoint modules behind it, so a config
  that skips some checkpoint modules can decide for a fused layer. The unquantized default is
  `UnquantizedConfig` (engine.model.quantization.unquantized); `quant_config=None` means the same.
- A `LinearMethodBase` creates the layer's parameters (`create_weights`, which registers them on the
  layer with the metadata of engine.model.parameter so loaders can load and shard them), applies the
  layer (`apply(layer, x, bias)`), and gets `process_weights_after_loading(layer)`, called exactly once
  per layer after its weights are loaded or dummy-initialised (repacking for a kernel, transposes,
  scale fusion). The method object may be shared by many layers: its state lives on the layer.

This module imports no layer (the layers import it), so methods and configs never form a circle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from engine.model.layers.linear import LinearBase
    from engine.model.parameter import WeightLoader


class QuantizeMethodBase:
    """Anything a layer delegates its weights to. The hook runs once per layer after loading."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded checkpoint tensors into what `apply` reads. Default: nothing to do."""


class LinearMethodBase(QuantizeMethodBase, ABC):
    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        """Register this rank's parameters on `layer`, sized in logical (unpacked) units: the input
        slice this rank holds, and the output rows of each fused sub-matrix (q, k, v / gate, up)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """[num_tokens, input_size_per_partition] -> [num_tokens, sum(output_partition_sizes)]."""

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """For a bias-free [gate; up] layer (two equal halves): silu(x gate^T) * (x up^T), [num_tokens,
        half], computed in the matmul's own launch where this method has a path for x (decode batches
        on a GEMV: the SiLU-mul kernel's launch saved); None where it has not (then `apply` and the
        activation kernel). Default: none."""
        del layer, x
        return None


class FusedMoEMethodBase(QuantizeMethodBase, ABC):
    """A mixture-of-experts layer's stacked experts (engine.model.layers.fused_moe.FusedMoE): the
    method registers them through `layer.add_expert_param` (which names their checkpoint tensors and
    loads each expert's slice) and runs them through the layer's `fused_moe` op."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, params_dtype: torch.dtype) -> None:
        """Register this rank's expert parameters on `layer` (sizes: layer.num_experts, hidden_size,
        intermediate_per_partition)."""

    @abstractmethod
    def apply(
        self,
        layer: nn.Module,
        x: torch.Tensor,  # [num_tokens, hidden]
        topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
        topk_ids: torch.Tensor,  # [num_tokens, top_k]
    ) -> torch.Tensor:  # [num_tokens, hidden]: this rank's partial sum
        """The routed experts' weighted sum for each token."""


class QuantizationConfig(ABC):
    """Picks each layer's method. One instance per model; frozen after construction."""

    name: str = ""

    @abstractmethod
    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        """The method for the linear layer named `prefix`."""

    def moe_refusal(self) -> str | None:
        """Why this config cannot run a mixture-of-experts model's experts (None: `get_moe_method`
        can). Asked once at start (EngineConfig.resolve), so a refused checkpoint never loads."""
        return (
            f"MoE experts are not supported with {self.name}; serve an unquantized, FP8, GPTQ, AWQ or "
            "compressed-tensors checkpoint"
        )

    def get_moe_method(self, layer: nn.Module, prefix: str) -> FusedMoEMethodBase:
        """The method for the stacked experts named `prefix` (a FusedMoE layer)."""
        del layer, prefix
        raise ValueError(self.moe_refusal())
