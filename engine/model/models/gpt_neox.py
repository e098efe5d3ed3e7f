"""GPT-NeoX (`GPTNeoXForCausalLM`: Pythia, Dolly v2, RedPajama-INCITE, GPT-NeoX-20B): transformers'
modeling_gpt_neox on the Llama attention (engine.model.models.llama) with:
- q, k and v in one checkpoint tensor, `attention.query_key_value` [3 * hidden, hidden], its rows per head
  as [q, k, v] (head 0's q, k, v, then head 1's): loaded into weir's [all q | all k | all v] layout by
  `HeadInterleavedQKVLinear`; biases on it and on `attention.dense` (`attention_bias`);
- a partial rotary (`rotary_pct` / `partial_rotary_factor`, default 0.25; `rotary_emb_base`);
- LayerNorms with weight and bias (`layer_norm_eps`) before attention and before the MLP, and the
  parallel residual of most checkpoints (`use_parallel_residual`: h + attn(ln1(h)) + mlp(ln2(h))) or the
  sequential one;
- an ungated MLP `dense_h_to_4h` -> GELU (exact, `hidden_act` "gelu") -> `dense_4h_to_h`, with biases;
- the decoder under `gpt_neox.` (`embed_in`, `layers`, `final_layer_norm`) and the head as `embed_out`.
LoRA applies to `dense`, `dense_h_to_4h` and `dense_4h_to_h`, not to the fused `query_key_value` (its B
rows come in the per-head order); quantized checkpoints are refused at start (engine.config).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.checkpoint_slice import materialize
from engine.model.layers.linear import QKVParallelLinear
from engine.model.layers.norm import LayerNorm
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.olmo import LayerNormDecoderModel
from engine.model.models.phi import PhiAttention
from engine.model.models.ungated_mlp import UngatedMLP
from engine.model_config import ModelConfig


class HeadInterleavedQKVLinear(QKVParallelLinear):
    """QKVParallelLinear whose fused checkpoint tensor holds each head's q, k and v rows together
    ([heads, 3, head_dim, ...]): reordered to [3, heads, head_dim, ...] before the usual split."""

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None:
            whole = materialize(loaded_weight)  # [heads * 3 * head_dim, ...] (weight or bias)
            heads, d = self.total_num_heads, self.head_size
            loaded_weight = whole.reshape(heads, 3, d, *whole.shape[1:]).transpose(0, 1).reshape(whole.shape)
        super().weight_loader(param, loaded_weight, shard_id)


class GPTNeoXAttention(PhiAttention):  # the output projection is `dense` too
    qkv_class = HeadInterleavedQKVLinear


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        eps, dtype = config.layer_norm_eps, ctx.dtype
        self.self_attn = GPTNeoXAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        names = ("dense_h_to_4h", "dense_4h_to_h")
        self.mlp = UngatedMLP(config, ctx, join_prefix(prefix, "mlp"), names, bias=True)
        self.input_layernorm = LayerNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps, dtype)
        self.parallel_residual = config.parallel_residual

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer."""
        attn = self.self_attn(positions, self.input_layernorm(hidden))
        if self.parallel_residual:  # transformers' order of the sums: (MLP + attention) + residual
            return self.mlp(self.post_attention_layernorm(hidden)) + attn + hidden
        hidden = attn + hidden
        return self.mlp(self.post_attention_layernorm(hidden)) + hidden


class GPTNeoXModel(LayerNormDecoderModel):
    layer_class = GPTNeoXLayer


class GPTNeoXForCausalLM(DecoderForCausalLM):
    # the checkpoint's names -> weir's (applied in this order)
    checkpoint_renames = {
        "gpt_neox.embed_in.": "model.embed_tokens.",
        "gpt_neox.final_layer_norm.": "model.norm.",
        "gpt_neox.layers.": "model.layers.",
        ".attention.query_key_value.": ".self_attn.qkv_proj.",
        ".attention.dense.": ".self_attn.dense.",
        "embed_out.": "lm_head.",
    }
    lora_hub_names = {"model.layers.": "gpt_neox.layers.", ".self_attn.": ".attention."}
    lora_unsupported_modules = ("qkv_proj",)

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, GPTNeoXModel)
