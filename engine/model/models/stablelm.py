"""StableLM (`StableLmForCausalLM`: StableLM 2 1.6B, StableLM 3B 4E1T, StableLM Zephyr): the Llama
attention and MLP (engine.model.models.llama) with transformers' modeling_stablelm's differences:
- LayerNorms with weight and bias (`layer_norm_eps`) before attention, before the MLP and at the end;
- a partial rotary (`partial_rotary_factor`, default 0.25: the first quarter of each head rotates);
- q/k/v biases when `use_qkv_bias`, none on o_proj or the MLP.
The layout with a parallel residual or per-head q/k LayerNorms (StableLM 2 12B: `use_parallel_residual`,
`qk_layernorm`) is refused at start (engine.model_config).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.norm import LayerNorm
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.llama import LlamaAttention, LlamaMLP
from engine.model.models.olmo import LayerNormDecoderModel
from engine.model_config import ModelConfig


class StableLmDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        eps, dtype = config.layer_norm_eps, ctx.dtype
        self.self_attn = LlamaAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = self.build_mlp(config, ctx, join_prefix(prefix, "mlp"))
        self.input_layernorm = LayerNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps, dtype)

    def build_mlp(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> nn.Module:
        """The layer's MLP (StarCoder2's layer is this one with its own)."""
        return LlamaMLP(config, ctx, prefix)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer."""
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class StableLmModel(LayerNormDecoderModel):
    layer_class = StableLmDecoderLayer


class StableLmForCausalLM(DecoderForCausalLM):
    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, StableLmModel)
