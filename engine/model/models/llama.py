"""The Llama decoder family in one implementation: Llama 1/2/3 (incl. llama3 rope scaling), Mistral,
Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm), with optional tied embeddings.

The variants differ only in flags read from ModelConfig (qkv_bias, o_proj_bias, mlp_bias, qk_norm,
rope_scaling, tie_word_embeddings). Parameter names mirror the Hugging Face checkpoints, except that
q/k/v and gate/up are fused: `packed_modules_mapping` tells the weight loader how.

Input is a flat batch of this step's tokens from every sequence ([num_tokens]); the attention layers
find the sequence boundaries in the step's AttentionMetadata.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.layers.activation import SiluAndMul
from engine.model.layers.attention import Attention
from engine.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.model.layers.linear import (
    LinearMethod,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine.model.layers.norm import RMSNorm
from engine.model.layers.rotary import RotaryEmbedding
from engine.model_config import ModelConfig


class LlamaMLP(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        tp = dict(params_dtype=dtype, linear_method=linear_method, tp_rank=tp_rank, tp_size=tp_size)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=config.mlp_bias, **tp
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias, **tp
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        tp = dict(params_dtype=dtype, linear_method=linear_method, tp_rank=tp_rank, tp_size=tp_size)
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.qkv_bias,
            **tp,
        )
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, bias=config.o_proj_bias, **tp
        )
        if config.qk_norm:
            self.q_norm: RMSNorm | None = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            self.k_norm: RMSNorm | None = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_model_len, config.rope_theta, config.rope_scaling
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.num_kv_heads, scale=self.head_dim**-0.5, layer_idx=layer_idx
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            # Per-head RMSNorm: view heads as rows.
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, dtype, linear_method, tp_rank, tp_size)
        self.mlp = LlamaMLP(config, dtype, linear_method, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, dtype, tp_rank=tp_rank, tp_size=tp_size
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype, linear_method, tp_rank, tp_size)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # fused parameter -> (checkpoint module name, shard_id) it is loaded from, in order.
    packed_modules_mapping: dict[str, list[tuple[str, str | int]]] = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        linear_method: LinearMethod | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, linear_method, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, dtype, tp_rank=tp_rank, tp_size=tp_size
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
        """[num_rows, hidden] -> [num_rows, vocab_size] float32."""
        return self.lm_head.logits(hidden)
