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
from engine.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine.model.layers.norm import LayerNorm
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.llama import LlamaAttention
from engine.model.models.olmo import OlmoModel
from engine.model_config import ModelConfig


class Starcoder2MLP(nn.Module):
    def __init__(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        args = ctx.linear_args()
        self.c_fc = ColumnParallelLinear(
            config.hidden_size,
            config.intermediate_size,
            bias=config.mlp_bias,
            prefix=join_prefix(prefix, "c_fc"),
            **args,
        )
        self.c_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=config.mlp_bias,
            prefix=join_prefix(prefix, "c_proj"),
            **args,
        )
        # torch's GELU in the model dtype, as transformers' activation module runs it
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] -> [num_tokens, hidden]; this rank's c_fc columns feed its c_proj rows."""
        h = self.c_fc(x)  # [num_tokens, intermediate / tp]
        return self.c_proj(nn.functional.gelu(h, approximate=self.approximate))


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        eps, dtype = config.layer_norm_eps, ctx.dtype
        self.self_attn = LlamaAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = Starcoder2MLP(config, ctx, join_prefix(prefix, "mlp"))
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
