"""GLM-4 (`GlmForCausalLM`: glm-4-9b(-chat)-hf) and GLM-4-0414 (`Glm4ForCausalLM`: GLM-4-9B/32B-0414,
GLM-Z1): the Llama decoder (engine.model.models.llama) as transformers' modeling_glm / modeling_glm4 build it.
Helium (`HeliumForCausalLM`: q/k/v biases by `attention_bias`, the MLP's by `mlp_bias`) and ERNIE 4.5 dense
(`Ernie4_5ForCausalLM`: every projection's bias by `use_bias`) are GlmForCausalLM too: the Llama decoder with
the same interleaved rope over the whole head (their flags read by engine.model_config). GLM's:
- rotary over the first half of each head (`partial_rotary_factor`, default 0.5) on interleaved pairs of
  dims (2i, 2i + 1), GPT-J style, where weir's kernels rotate halves (i, i + rotary_dim / 2). Reordering the
  rotary rows of each head of q_proj and k_proj at load (the even dims, then the odd ones) turns one into
  the other: q and k get the same order, so every q.k, and the attention, is unchanged; v and the output
  projection are untouched (`InterleavedRopeQKVLinear`);
- q/k/v biases (`attention_bias`, on by default), none on o_proj or the MLP;
- the MLP's gate and up projections fused in the checkpoint (`gate_up_proj`, gate first), as Phi-3's;
- GLM-4-0414 adds a norm after attention and after the MLP, before each residual add
  (`post_self_attn_layernorm`, `post_mlp_layernorm`; `post_attention_layernorm` is the norm before the MLP).

The reordering is of rows: float weights and FP8 ones (checkpoints with `quant_method` fp8, per tensor, channel
or block, and online `--quantization fp8`) take it; checkpoints whose rows are packed (GPTQ, AWQ, SqueezeLLM,
compressed-tensors) are refused at start (engine.config). Adapters
take it too: an adapter's B rows for q_proj and k_proj are reordered the same way as it loads
(`lora_b_row_order`), so adapters apply to all seven projections (gate_up_proj whole, as PEFT adapts the
fused layer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.checkpoint_slice import materialize
from engine.model.layers.linear import QKVParallelLinear
from engine.model.layers.norm import RMSNorm
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)
from engine.model.models.olmo2 import Olmo2Model
from engine.model_config import ModelConfig


def interleaved_to_halves(rows: torch.Tensor, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """q or k projection rows [heads * head_dim, ...] (a weight or a bias) with each head's first
    rotary_dim rows reordered from interleaved pairs to halves: new row j < rotary_dim / 2 is old row 2j,
    new row rotary_dim / 2 + j is old row 2j + 1; the rows past rotary_dim stay."""
    heads = rows.shape[0] // head_dim
    per_head = rows.reshape(heads, head_dim, *rows.shape[1:])
    order = torch.cat(
        [torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2), torch.arange(rotary_dim, head_dim)]
    )
    return per_head[:, order].reshape(rows.shape)


class InterleavedRopeQKVLinear(QKVParallelLinear):
    """QKVParallelLinear for a checkpoint whose rope turns interleaved pairs: its q and k shards' rows are
    reordered at load (interleaved_to_halves), before the usual per-rank split (a rank's heads are whole)."""

    rotary_dim = 0  # set by InterleavedRopeAttention once built

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None:  # these families' checkpoints keep q_proj, k_proj and v_proj apart
            raise ValueError(
                f"{self.prefix}: a fused q/k/v tensor is not supported where the rope turns interleaved pairs"
            )
        heads = {"q": self.total_num_heads, "k": self.total_num_kv_heads}.get(shard_id)
        block_rows = getattr(param, "pack_factor", None)  # an FP8 block-scale grid: rows per block
        if heads is not None and block_rows is not None and block_rows % self.head_size:
            raise ValueError(
                f"{self.prefix}: FP8 weight blocks of {block_rows} rows split heads of {self.head_size}; their q/k "
                "rows are reordered within each head at load, which would move rows between blocks"
            )
        if heads is not None and loaded_weight.shape[0] == heads * self.head_size:
            # a row per output dim: the weight, its bias, an FP8 checkpoint's per-channel scales ([rows] or
            # [rows, 1]); a per-tensor scale or a block-scale grid (blocks of whole heads) keeps its order
            loaded_weight = interleaved_to_halves(materialize(loaded_weight), self.head_size, self.rotary_dim)
        super().weight_loader(param, loaded_weight, shard_id)

    def lora_b_row_order(self, index: int) -> torch.Tensor | None:
        """An adapter's B rows for sub-matrix `index` (q 0, k 1, v 2) in this layer's row order: q's and k's
        reordered as their weights were (engine.lora.layers.lora_targets)."""
        if index == 2:
            return None
        heads = self.total_num_heads if index == 0 else self.total_num_kv_heads
        return interleaved_to_halves(torch.arange(heads * self.head_size), self.head_size, self.rotary_dim)


class InterleavedRopeAttention(LlamaAttention):
    """Llama's attention for checkpoints whose rope turns interleaved pairs (GLM, Cohere)."""

    qkv_class = InterleavedRopeQKVLinear

    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__(config, layer_idx, ctx, prefix)
        self.qkv_proj.rotary_dim = config.rotary_dim


class GlmDecoderLayer(LlamaDecoderLayer):
    attention_class = InterleavedRopeAttention


class GlmModel(LlamaModel):
    layer_class = GlmDecoderLayer


class GlmForCausalLM(LlamaForCausalLM):
    model_class = GlmModel


class Glm4DecoderLayer(nn.Module):
    """A norm before and after each of attention and the MLP; the layer adds its own residuals (no fused
    add + norm: the add comes after the branch's own norm)."""

    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        eps, dtype, kernels = config.rms_norm_eps, ctx.dtype, ctx.kernels
        self.self_attn = InterleavedRopeAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = LlamaMLP(config, ctx, join_prefix(prefix, "mlp"))
        norms = (
            "input_layernorm",
            "post_self_attn_layernorm",
            "post_attention_layernorm",
            "post_mlp_layernorm",
        )
        for name in norms:
            setattr(self, name, RMSNorm(config.hidden_size, eps, dtype, kernels, join_prefix(prefix, name)))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer."""
        attn = self.self_attn(positions, self.input_layernorm(hidden))
        hidden = hidden + self.post_self_attn_layernorm(attn)
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + self.post_mlp_layernorm(mlp)


class Glm4Model(Olmo2Model):  # OLMo 2's decoder: layers that add their own residuals, a final RMSNorm
    layer_class = Glm4DecoderLayer


class Glm4ForCausalLM(DecoderForCausalLM):
    checkpoint_fused_modules = ("gate_up_proj",)

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, Glm4Model)
