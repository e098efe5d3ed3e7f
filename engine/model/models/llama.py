"""The Llama decoder family in one implementation: Llama 1/2/3 (incl. llama3 rope scaling), Mistral,
Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm) and Phi-3 (Phi-3/3.5-mini, Phi-3-medium, Phi-4,
Phi-4-mini: partial rotary, longrope), Ministral (sliding windows by `layer_types`), Seed-OSS (q/k/v
biases, o_proj's and the MLP's by their own flags), SmolLM3 (NoPE layers) and Granite 3.x dense
(embedding, residual and attention multipliers, logits scaling), with optional tied embeddings and sliding-window layers (Mistral's
`sliding_window`, Qwen's `use_sliding_window`: ModelConfig.layer_window).

The variants differ only in flags read from ModelConfig (qkv_bias, o_proj_bias, mlp_bias, qk_norm,
rope_scaling, rotary_dim, tie_word_embeddings): Phi-3's decoder layer is Llama's (its residual
dropouts are identities at inference). The mixture-of-experts families (engine.model.models.moe) are
this model with another MLP in some layers: the class's `build_mlp` picks each layer's. Parameter names
mirror the Hugging Face checkpoints, except that q/k/v and gate/up are fused: `packed_modules_mapping`
tells the weight loader how. Phi-3 checkpoints store `qkv_proj` and `gate_up_proj` already fused under
our names: each fused layer's loader splits such a tensor into its q/k/v (gate/up) sections and loads
each as that shard, so a tensor-parallel rank takes its slice of every section.

Built from a BuildContext (engine.model.build_context): dtype, quantization config (each linear
layer asks it for its method by prefix), the attention backend (every Attention layer holds it; the
other ops use its kernels) and tensor-parallel rank/size. Every layer gets its dotted `prefix`.

Input is a flat batch of this step's tokens from every sequence ([num_tokens]); the attention layers
find the sequence boundaries in the step's AttentionMetadata.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.activation import SiluAndMul
from engine.model.layers.attention import Attention
from engine.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.model.layers.norm import RMSNorm
from engine.model.layers.rotary import RotaryEmbedding
from engine.model.models.causal_lm import DecoderForCausalLM, token_embedding
from engine.model.quantization.fp8_activation import Fp8Activation, takes_fp8_activation
from engine.model_config import ModelConfig


class LlamaMLP(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        ctx: BuildContext,
        prefix: str,
        intermediate_size: int | None = None,  # None: the config's (an MoE model's shared expert: its own)
        reduce_results: bool = True,  # False: the caller all-reduces this rank's partial sum with others
    ) -> None:
        super().__init__()
        args = ctx.linear_args()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [intermediate_size] * 2,
            bias=config.mlp_bias,
            prefix=join_prefix(prefix, "gate_up_proj"),
            **args,
        )
        self.down_proj = RowParallelLinear(
            intermediate_size,
            config.hidden_size,
            bias=config.mlp_bias,
            reduce_results=reduce_results,
            prefix=join_prefix(prefix, "down_proj"),
            **args,
        )
        self.act_fn = SiluAndMul(ctx.kernels, prefix=join_prefix(prefix, "act_fn"))

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            act = self.gate_up_proj.silu_mul(x)  # decode batches on a GEMV: the activation in its launch
            if act is not None:
                return self.down_proj(act)
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate]
        fp8 = takes_fp8_activation(self.down_proj, gate_up.shape[0], gate_up.dtype)
        return self.down_proj(self.act_fn(gate_up, fp8))


class LlamaAttention(nn.Module):
    # q/k norms (Qwen3, Gemma 3): their class; engine.model.models.gemma swaps in Gemma's (1 + weight) norm
    qk_norm_class: type[RMSNorm] = RMSNorm
    # the output projection's name in the checkpoints, its prefix (Phi's is `dense`)
    output_name = "o_proj"
    # the fused q/k/v layer (GPT-NeoX's loads its checkpoint's per-head [q, k, v] rows: gpt_neox.py)
    qkv_class: type[QKVParallelLinear] = QKVParallelLinear

    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        kernels = ctx.kernels
        args = ctx.linear_args()
        self.head_dim = config.head_dim
        self.qkv_proj = self.qkv_class(
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
            prefix=join_prefix(prefix, self.output_name),
            **args,
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            norm, eps = self.qk_norm_class, config.rms_norm_eps
            self.q_norm = norm(config.head_dim, eps, ctx.dtype, kernels, join_prefix(prefix, "q_norm"))
            self.k_norm = norm(config.head_dim, eps, ctx.dtype, kernels, join_prefix(prefix, "k_norm"))
        rope_theta, rope_scaling = config.layer_rope(layer_idx)  # Gemma 3's sliding layers: their own
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_model_len,
            rope_theta,
            rope_scaling,
            kernels,
            prefix=join_prefix(prefix, "rotary_emb"),
            rotary_dim=config.rotary_dim,
            identity=not config.layer_has_rope(layer_idx),  # SmolLM3's NoPE layers
        )
        # Granite: its attention_multiplier; Gemma 2/3: query_pre_attn_scalar ** -0.5; else head_dim ** -0.5
        scale = config.attention_multiplier or (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.num_kv_heads,
            scale=scale,
            layer_idx=layer_idx,
            attn_backend=ctx.backend,
            prefix=join_prefix(prefix, "attn"),
            total_num_kv_heads=config.num_kv_heads,
            kv_head_offset=self.qkv_proj.kv_head_offset,
            sliding_window=config.layer_window(layer_idx),  # Mistral, Qwen, Phi-3, Gemma 2/3's sliding layers
            logit_softcap=config.attn_logit_softcapping,  # Gemma 2
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | Fp8Activation) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            # Per-head RMSNorm: view heads as rows.
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        # Rotary runs inside the attention layer, in the launch that stores K/V (one kernel fewer).
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb.cos_sin_cache))


# (config, layer_idx, ctx, prefix) -> the layer's MLP module, which maps [num_tokens, hidden] to the same
MlpBuilder = Callable[[ModelConfig, int, BuildContext, str], nn.Module]


def dense_mlp(config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> nn.Module:
    del layer_idx  # every layer of a dense model has the same MLP
    return LlamaMLP(config, ctx, prefix)


class LlamaDecoderLayer(nn.Module):
    attention_class: type[LlamaAttention] = LlamaAttention  # GLM's reorders its q/k rows at load

    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        ctx: BuildContext,
        prefix: str,
        build_mlp: MlpBuilder = dense_mlp,
    ) -> None:
        super().__init__()
        kernels = ctx.kernels
        eps = config.rms_norm_eps
        self.self_attn = self.attention_class(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = build_mlp(config, layer_idx, ctx, join_prefix(prefix, "mlp"))
        # Only a dense MLP's gate_up_proj may take an FP8 activation straight from the norm.
        self.dense_mlp = isinstance(self.mlp, LlamaMLP)
        self.input_layernorm = RMSNorm(
            config.hidden_size, eps, ctx.dtype, kernels, join_prefix(prefix, "input_layernorm")
        )
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps, ctx.dtype, kernels, join_prefix(prefix, "post_attention_layernorm")
        )
        # Granite scales each branch before its residual add; the add itself is the next norm's fused
        # one, so the branch output is scaled here and the sum (residual + m * branch) stays transformers'.
        self.residual_multiplier = config.residual_multiplier

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # An FP8 W8A8 projection after a norm takes the norm already quantized (fp8_activation).
        num_tokens, dtype = hidden.shape[0], hidden.dtype
        fp8 = takes_fp8_activation(self.self_attn.qkv_proj, num_tokens, dtype)
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden, None, fp8)
        else:
            normed, residual = self.input_layernorm(hidden, residual, fp8)
        hidden = self.self_attn(positions, normed)
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        fp8 = self.dense_mlp and takes_fp8_activation(self.mlp.gate_up_proj, num_tokens, dtype)
        normed, residual = self.post_attention_layernorm(hidden, residual, fp8)
        hidden = self.mlp(normed)
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        return hidden, residual


class LlamaModel(nn.Module):
    layer_class: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(
        self, config: ModelConfig, ctx: BuildContext, prefix: str, build_mlp: MlpBuilder = dense_mlp
    ) -> None:
        super().__init__()
        self.embed_tokens = token_embedding(config, ctx, prefix)
        self.layers = nn.ModuleList(
            self.layer_class(config, i, ctx, join_prefix(prefix, f"layers.{i}"), build_mlp)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(
            config.hidden_size,
            config.rms_norm_eps,
            ctx.dtype,
            ctx.kernels,
            join_prefix(prefix, "norm"),
        )
        self.embedding_multiplier = config.embedding_multiplier  # Granite's; 1.0 elsewhere

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier  # in the model dtype, as transformers
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(DecoderForCausalLM):
    build_mlp: MlpBuilder = staticmethod(dense_mlp)
    model_class: type[LlamaModel] = LlamaModel

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        build_mlp, model_class = type(self).build_mlp, type(self).model_class
        super().__init__(
            config,
            ctx or BuildContext(),
            prefix,
            lambda config, ctx, prefix: model_class(config, ctx, prefix, build_mlp),
        )
        # Fused layers whose checkpoints (and PEFT adapters) name them whole, under our names.
        self.checkpoint_fused_modules: tuple[str, ...] = {
            "Phi3ForCausalLM": ("qkv_proj", "gate_up_proj"),
            "GlmForCausalLM": ("gate_up_proj",),
        }.get(config.architecture, ())

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab_size] float32; Granite's divided by logits_scaling
        (a division, as transformers', so the float32 logits are bit-equal, not one ulp off)."""
        logits = super().compute_logits(hidden)
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits
