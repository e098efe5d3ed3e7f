"""StarCoder2 (`Starcoder2ForCausalLM`: starcoder2-3b, -7b, -15b): the Llama attention
(engine.model.models.llama) with transformers' modeling_starcoder2's differences:
- a plain two-layer MLP, `c_fc` -> GELU -> `c_proj` (no gate), the tanh-approximate GELU of its
  checkpoints (`hidden_act` "gelu_pytorch_tanh"; exact "gelu" too);
- biases on q/k/v, o_proj and both MLP projections when `use_bias` (the default);
- LayerNorms with weight and bias (`norm_epsilon`) before attention, before the MLP and at the end;
- every layer windowed when `sliding_window` is set (the released checkpoints: 4,096), as Mistral's;
- the embedding tied to the LM head by default (Starcoder2Config's `tie_word_embeddings` True).
Its dropouts are identities at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.norm import LayerNorm
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.gelu_mlp import GeluMLP
from engine.model.models.llama import LlamaAttention
from engine.model.models.olmo import OlmoModel
from engine.model_config import ModelConfig


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        eps, dtype = config.layer_norm_eps, ctx.dtype
        self.self_attn = LlamaAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = GeluMLP(config, ctx, join_prefix(prefix, "mlp"), ("c_fc", "c_proj"), config.mlp_bias)
        self.input_layernorm = LayerNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer."""
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Starcoder2Model(OlmoModel):
    layer_class = Starcoder2DecoderLayer

    def final_norm(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_eps, ctx.dtype)


class Starcoder2ForCausalLM(DecoderForCausalLM):
    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, Starcoder2Model)
