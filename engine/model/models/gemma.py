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
from engine.model.layers.attention import Attention
from engine.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.model.layers.norm import GemmaRMSNorm
from engine.model.layers.rotary import RotaryEmbedding
from engine.model_config import ModelConfig


def _linear_args(ctx: BuildContext) -> dict:
    return dict(
        params_dtype=ctx.dtype, quant_config=ctx.quant_config, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size
    )


def _has_sandwich_norms(config: ModelConfig) -> bool:
    """Gemma 2/3 norm each sub-layer's output too (pre/post attention and feed-forward norms)."""
    return config.architecture != "GemmaForCausalLM"


class GemmaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        args = _linear_args(ctx)
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


class GemmaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        args = _linear_args(ctx)
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.qkv_bias,
            prefix=join_prefix(prefix, "qkv_proj"),
            **args,
        )
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim,
            config.hidden_size,
            bias=config.o_proj_bias,
            prefix=join_prefix(prefix, "o_proj"),
            **args,
        )
        self.q_norm: GemmaRMSNorm | None = None
        self.k_norm: GemmaRMSNorm | None = None
        if config.qk_norm:  # Gemma 3
            eps, dtype, kernels = config.rms_norm_eps, ctx.dtype, ctx.kernels
            self.q_norm = GemmaRMSNorm(config.head_dim, eps, dtype, kernels, join_prefix(prefix, "q_norm"))
            self.k_norm = GemmaRMSNorm(config.head_dim, eps, dtype, kernels, join_prefix(prefix, "k_norm"))
        rope_theta, rope_scaling = config.layer_rope(layer_idx)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_model_len,
            rope_theta,
            rope_scaling,
            ctx.kernels,
            prefix=join_prefix(prefix, "rotary_emb"),
        )
        scalar = config.query_pre_attn_scalar or config.head_dim  # Gemma 1: head_dim
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.num_kv_heads,
            scale=scalar**-0.5,
            layer_idx=layer_idx,
            attn_backend=ctx.backend,
            prefix=join_prefix(prefix, "attn"),
            total_num_kv_heads=config.num_kv_heads,
            kv_head_offset=self.qkv_proj.kv_head_offset,
            sliding_window=config.layer_window(layer_idx),
            logit_softcap=config.attn_logit_softcapping,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            # Per-head norm: view heads as rows.
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        # Rotary runs inside the attention layer, in the launch that stores K/V.
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb.cos_sin_cache))


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
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            ctx.dtype,
            tp_rank=ctx.tp_rank,
            tp_size=ctx.tp_size,
            prefix=join_prefix(prefix, "embed_tokens"),
        )
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


class GemmaForCausalLM(nn.Module):
    # fused parameter -> (checkpoint module name, shard_id) it is loaded from, in order.
    packed_modules_mapping: dict[str, list[tuple[str, str | int]]] = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__()
        ctx = ctx or BuildContext()
        self.config = config
        self.final_logit_softcap = config.final_logit_softcapping
        self.model = GemmaModel(config, ctx, join_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            ctx.dtype,
            tp_rank=ctx.tp_rank,
            tp_size=ctx.tp_size,
            prefix=join_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
    ) -> torch.Tensor:  # [num_tokens, hidden]
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab_size] float32, softcapped (Gemma 2) as transformers:
        logits / c, tanh, * c."""
        logits = self.lm_head.logits(hidden)
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits
