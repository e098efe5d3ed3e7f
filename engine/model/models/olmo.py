"""OLMo 1 (`OlmoForCausalLM`, the `-hf` checkpoints): the Llama decoder's attention and MLP
(engine.model.models.llama) with transformers' modeling_olmo's two differences:
- every norm (before attention, before the MLP, after the last layer) is a LayerNorm without weight or
  bias, in float32 (NonParametricLayerNorm); the checkpoints hold no norm tensors;
- `clip_qkv`, when set, clamps the q, k and v projections to [-clip_qkv, clip_qkv] before rope.
The residual adds are the layer's own (the fused add + RMSNorm kernels do not apply).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.norm import LayerNorm, NonParametricLayerNorm
from engine.model.models.causal_lm import DecoderForCausalLM, token_embedding
from engine.model.models.llama import LlamaAttention, LlamaMLP
from engine.model_config import ModelConfig


class OlmoAttention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__(config, layer_idx, ctx, prefix)
        self.clip_qkv = config.clip_qkv

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, q_size + 2 * kv_size]
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)  # q, k and v alike, as three clamps would
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb.cos_sin_cache))


class OlmoDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        self.self_attn = OlmoAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = LlamaMLP(config, ctx, join_prefix(prefix, "mlp"))
        self.input_layernorm = NonParametricLayerNorm(config.hidden_size)
        self.post_attention_layernorm = NonParametricLayerNorm(config.hidden_size)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer."""
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class OlmoModel(nn.Module):
    """Embedding, decoder layers that add their own residuals, final norm (OLMo 1; OLMo 2 swaps the layer
    class and the norm)."""

    layer_class: type[nn.Module] = OlmoDecoderLayer

    def __init__(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        self.embed_tokens = token_embedding(config, ctx, prefix)
        layer_class = type(self).layer_class
        self.layers = nn.ModuleList(
            layer_class(config, i, ctx, join_prefix(prefix, f"layers.{i}")) for i in range(config.num_layers)
        )
        self.norm = self.final_norm(config, ctx, join_prefix(prefix, "norm"))

    def final_norm(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> nn.Module:
        return NonParametricLayerNorm(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


class LayerNormDecoderModel(OlmoModel):
    """The same decoder ending in a LayerNorm with weight and bias (`layer_norm_eps`): StableLM, StarCoder2,
    Phi and GPT-NeoX, which set only their layer class."""

    def final_norm(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_eps, ctx.dtype)


class OlmoForCausalLM(DecoderForCausalLM):
    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, OlmoModel)
