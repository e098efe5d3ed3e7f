"""Phi-1, Phi-1.5 and Phi-2 (`PhiForCausalLM`): transformers' modeling_phi, on the Llama attention
(engine.model.models.llama) with:
- a parallel block: one LayerNorm (weight and bias, `layer_norm_eps`) feeds both attention and the MLP,
  and the layer adds both to its input: h + attn(ln(h)) + mlp(ln(h));
- biases on q/k/v and on the output projection, named `dense` in the checkpoints;
- an ungated MLP `fc1` -> GELU (`gelu_new`, the tanh form) -> `fc2`, with biases (engine.model.models.ungated_mlp);
- a partial rotary (`partial_rotary_factor`, default 0.5; Phi-2: 0.4 of 80-dim heads);
- `final_layernorm` after the last layer, and an LM head with a bias.
Per-head q/k LayerNorms (`qk_layernorm`) are refused at start (engine.model_config). Its dropouts are
identities at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.norm import LayerNorm
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.llama import LlamaAttention
from engine.model.models.olmo import LayerNormDecoderModel
from engine.model.models.ungated_mlp import UngatedMLP
from engine.model_config import ModelConfig


class PhiAttention(LlamaAttention):
    output_name = "dense"  # the output projection's checkpoint name (LlamaAttention builds it under it)

    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__(config, layer_idx, ctx, prefix)
        self.dense = self.o_proj  # registered under the checkpoint's name only
        del self.o_proj

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.dense(self.attn(q, k, v, positions, self.rotary_emb.cos_sin_cache))


class PhiDecoderLayer(nn.Module):
    """The parallel block: attention and the MLP on one LayerNorm's output (GPT-J's too, its own classes)."""

    attention_class: type[LlamaAttention] = PhiAttention
    mlp_names = ("fc1", "fc2")  # the ungated MLP's (up, down) checkpoint names

    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        self.self_attn = self.attention_class(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = UngatedMLP(config, ctx, join_prefix(prefix, "mlp"), self.mlp_names, bias=True)
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, ctx.dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer."""
        normed = self.input_layernorm(hidden)
        # transformers' order of the sums: (attention + MLP) + residual
        return self.self_attn(positions, normed) + self.mlp(normed) + hidden


class PhiModel(LayerNormDecoderModel):
    layer_class = PhiDecoderLayer


class PhiForCausalLM(DecoderForCausalLM):
    checkpoint_renames = {"model.final_layernorm.": "model.norm."}

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, PhiModel)
