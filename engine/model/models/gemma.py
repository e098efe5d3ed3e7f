"""The Gemma decoders in one implementation: Gemma 1 (`GemmaForCausalLM`), Gemma 2 and Gemma 3 text
(`Gemma3ForCausalLM`), over the same layers as the Llama family (engine.model.models.llama).

What sets them apart, from ModelConfig:
- RMSNorm scaling by (1 + weight) in float32 (GemmaRMSNorm), the embeddings times sqrt(hidden_size)
  rounded to the model dtype, GeGLU with the tanh-approximate GELU, tied embeddings by default;
- Gemma 2/3: norms after attention and after the MLP as well as before them (the residual adds the
  normed outputs), softmax scale query_pre_attn_scalar ** -0.5, sliding-window layers (`layer_types`);
- Gemma 2: attention logit softcapping in the attention kernels, final logit softcapping in
  `compute_logits` (so logprobs and sampling see the capped logits);
- Gemma 3: q/k norms (Gemma's) before rope, and the sliding layers' own rope (rope_local_base_freq)
  while the global ones take rope_theta with rope_scaling.

As in llama.py the residual add is deferred into the next norm's fused add: a layer returns
(output, residual) whose sum is the residual stream.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.activation import GeluTanhAndMul
from engine.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from engine.model.layers.norm import GemmaRMSNorm
from engine.model.models.causal_lm import DecoderForCausalLM, token_embedding
from engine.model.models.llama import LlamaAttention
from engine.model_config import ModelConfig


def _has_sandwich_norms(config: ModelConfig) -> bool:
    """Gemma 2/3 norm each sub-layer's output too (pre/post attention and feed-forward norms)."""
    return config.architecture != "GemmaForCausalLM"


class GemmaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        args = ctx.linear_args()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=False,
            prefix=join_prefix(prefix, "gate_up_proj"),
            **args,
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=False,
            prefix=join_prefix(prefix, "down_proj"),
            **args,
        )
        self.act_fn = GeluTanhAndMul(ctx.kernels, prefix=join_prefix(prefix, "act_fn"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # via [num_tokens, 2 * intermediate]


class GemmaAttention(LlamaAttention):
    """Llama's attention layer as ModelConfig sets it for Gemma (softmax scale, windows, softcap, Gemma 3's
    local rope), with Gemma's (1 + weight) q/k norms (Gemma 3)."""

    qk_norm_class = GemmaRMSNorm


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = GemmaMLP(config, ctx, join_prefix(prefix, "mlp"))
        names = ["input_layernorm", "post_attention_layernorm"]
        if _has_sandwich_norms(config):
            names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        else:  # Gemma 1: Llama's two norms (its post_attention_layernorm comes before the MLP)
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        for name in names:
            norm = GemmaRMSNorm(
                config.hidden_size, config.rms_norm_eps, ctx.dtype, ctx.kernels, join_prefix(prefix, name)
            )
            setattr(self, name, norm)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, normed)
        if self.pre_feedforward_layernorm is None or self.post_feedforward_layernorm is None:  # Gemma 1
            normed, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(normed), residual
        hidden = self.post_attention_layernorm(hidden)
        normed, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(normed)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        self.embed_tokens = token_embedding(config, ctx, prefix)
        # sqrt(hidden_size) rounded to the model dtype first, as transformers scales (bfloat16 turns
        # sqrt(3072) = 55.43 into 55.5); a Python float of that value multiplies the same in every dtype.
        self.normalizer = torch.tensor(config.hidden_size**0.5, dtype=torch.float32).to(ctx.dtype).item()
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, ctx, join_prefix(prefix, f"layers.{i}"))
            for i in range(config.num_layers)
        )
        self.norm = GemmaRMSNorm(
            config.hidden_size, config.rms_norm_eps, ctx.dtype, ctx.kernels, join_prefix(prefix, "norm")
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.normalizer  # [num_tokens, hidden]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class GemmaForCausalLM(DecoderForCausalLM):
    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, GemmaModel)
        self.final_logit_softcap = config.final_logit_softcapping

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab_size] float32, softcapped (Gemma 2) as transformers:
        logits / c, tanh, * c."""
        logits = super().compute_logits(hidden)
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits
