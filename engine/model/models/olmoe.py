"""OLMoE (`OlmoeForCausalLM`: allenai/OLMoE-1B-7B-0924 and -0125, their -Instruct): the Llama decoder (norms
before attention and the MLP, engine.model.models.llama) whose MLP is the mixture of experts of
engine.model.models.moe in every layer, as transformers' modeling_olmoe:
- q and k are RMS-normed over the whole projection (all heads at once, OLMo 2's q/k norms), then
  `clip_qkv`, when set, clamps q, k and v to [-clip_qkv, clip_qkv] (after the norms), then rope;
- the router: a float32 softmax over every expert, the top `num_experts_per_tok`, renormalised only
  where `norm_topk_prob`, the weights cast to the model dtype (Qwen-MoE's routing).

Tensor parallelism is refused at start (engine.config, `qk_norm_across_heads`), as OLMo 2's: the q/k norms
need every head's sum of squares.
"""

from __future__ import annotations

import torch

from engine.model.build_context import BuildContext
from engine.model.models.llama import LlamaDecoderLayer, LlamaModel
from engine.model.models.moe import MoeForCausalLM
from engine.model.models.olmo2 import Olmo2Attention
from engine.model_config import ModelConfig


class OlmoeAttention(Olmo2Attention):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__(config, layer_idx, ctx, prefix)
        self.clip_qkv = config.clip_qkv

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # One row per token across all heads (the norm reads rows): [num_tokens, q_size] / [.., kv_size]
        q = self.q_norm(q.contiguous())
        k = self.k_norm(k.contiguous())
        if self.clip_qkv is not None:  # after the norms, on v too (transformers' order)
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb.cos_sin_cache))


class OlmoeDecoderLayer(LlamaDecoderLayer):
    attention_class = OlmoeAttention


class OlmoeModel(LlamaModel):
    layer_class = OlmoeDecoderLayer


class OlmoeForCausalLM(MoeForCausalLM):
    model_class = OlmoeModel
