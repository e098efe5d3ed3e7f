"""OLMo 2 (`Olmo2ForCausalLM`) and OLMo 3 (`Olmo3ForCausalLM`: OLMo 2's layers with sliding windows on three
layers of four, each kind with its own rope, read by engine.model_config): the Llama decoder's attention and MLP (engine.model.models.llama) with
its norms moved and widened, as transformers' modeling_olmo2:
- no norm before attention or the MLP: each sub-layer reads the residual stream itself, and its output
  is normed (post_attention_layernorm, post_feedforward_layernorm) before the residual add;
- q and k are RMS-normed over the whole projection (all heads at once: q_norm's weight is
  [num_heads * head_dim]), before rope, not per head as Qwen3's.

Tensor parallelism is refused: a rank holds only its heads, and the q/k norms need every head's sum of
squares (an all-reduce weir does not do here). EXAONE 4.0 (`Exaone4ForCausalLM`) is this layer with Qwen3's
per-head q/k norms instead (so it does take tensor parallelism) and, where it has windows, no rope on its
full layers.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.norm import RMSNorm
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.llama import LlamaAttention, LlamaMLP
from engine.model.models.olmo import OlmoModel
from engine.model_config import ModelConfig


class Olmo2Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__(config, layer_idx, ctx, prefix)  # config.qk_norm is off: no per-head norms
        eps, dtype, kernels = config.rms_norm_eps, ctx.dtype, ctx.kernels
        self.q_norm = RMSNorm(self.q_size, eps, dtype, kernels, join_prefix(prefix, "q_norm"))
        self.k_norm = RMSNorm(self.kv_size, eps, dtype, kernels, join_prefix(prefix, "k_norm"))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # One row per token across all heads (the norm reads rows): [num_tokens, q_size] / [.., kv_size]
        q = self.q_norm(q.contiguous())
        k = self.k_norm(k.contiguous())
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb.cos_sin_cache))


class Olmo2DecoderLayer(nn.Module):
    attention_class: type[LlamaAttention] = Olmo2Attention  # EXAONE 4's: Llama's, q/k normed per head

    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        eps, dtype, kernels = config.rms_norm_eps, ctx.dtype, ctx.kernels
        self.self_attn = self.attention_class(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = LlamaMLP(config, ctx, join_prefix(prefix, "mlp"))
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps, dtype, kernels, join_prefix(prefix, "post_attention_layernorm")
        )
        self.post_feedforward_layernorm = RMSNorm(
            config.hidden_size, eps, dtype, kernels, join_prefix(prefix, "post_feedforward_layernorm")
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer. (No fused
        add + norm: the add comes after the norm here, and the norm is of the branch alone.)"""
        hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, hidden))
        return hidden + self.post_feedforward_layernorm(self.mlp(hidden))


class Olmo2Model(OlmoModel):
    layer_class = Olmo2DecoderLayer

    def final_norm(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> nn.Module:
        return RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype, ctx.kernels, prefix)


class Exaone4DecoderLayer(Olmo2DecoderLayer):
    attention_class = LlamaAttention  # config.qk_norm: per-head q/k RMSNorm, as Qwen3's


class Exaone4Model(Olmo2Model):
    layer_class = Exaone4DecoderLayer


class Exaone4ForCausalLM(DecoderForCausalLM):
    """EXAONE 4.0 (`Exaone4ForCausalLM`): OLMo 2's layer (norms after attention and the MLP, none before) with
    per-head q/k norms, so tensor parallelism works; with windows (`sliding_window`, `layer_types` or
    `sliding_window_pattern`), its full layers have no rope (read by engine.model_config)."""

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, Exaone4Model)


class Olmo2ForCausalLM(DecoderForCausalLM):
    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        ctx = ctx or BuildContext()
        if ctx.tp_size > 1:
            raise ValueError(
                f"tensor_parallel_size {ctx.tp_size} is not supported for Olmo2ForCausalLM "
                f"({config.model_path}): its q/k norms span every attention head; serve it on one GPU"
            )
        super().__init__(config, ctx, prefix, Olmo2Model)
