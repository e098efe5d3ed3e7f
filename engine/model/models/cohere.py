"""Cohere Command R (`CohereForCausalLM`: c4ai-command-r-v01, Aya 23 / Expanse) and Command R7B / Command A
(`Cohere2ForCausalLM`), as transformers' modeling_cohere / modeling_cohere2 build them:
- a parallel block on one norm: h + attention(ln(h)) + mlp(ln(h)), the MLP Llama's gated SiLU one;
- LayerNorms with a weight and no bias, computed in float32 (`layer_norm_eps`);
- rope on interleaved pairs of dims over the whole head, served as GLM's is (q/k rows reordered at load,
  engine.model.models.glm); Cohere2 rotates only on its sliding-window layers (`layer_types`, or three
  sliding layers then a full one by `sliding_window_pattern`): its full layers have no position embedding
  (an identity rotary table, as SmolLM3's NoPE layers);
- the logits multiplied by `logit_scale` (0.0625 by default); embeddings tied by default.

Command R+'s per-head q/k LayerNorms (`use_qk_norm`) are refused at start (engine.model_config); quantized
checkpoints are refused as GLM's are; adapters apply to every projection (their q/k B rows reordered as GLM's).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.glm import InterleavedRopeAttention
from engine.model.models.llama import LlamaMLP
from engine.model.models.olmo import OlmoModel
from engine.model.parameter import default_weight_loader, set_weight_attrs
from engine.model_config import ModelConfig


class CohereLayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 and returned in the input's dtype."""

    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=params_dtype), requires_grad=False
        )  # [hidden]
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] -> the same shape and dtype."""
        normed = nn.functional.layer_norm(x.float(), self.weight.shape, self.weight.float(), None, self.eps)
        return normed.to(x.dtype)


class CohereDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        self.self_attn = InterleavedRopeAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = LlamaMLP(config, ctx, join_prefix(prefix, "mlp"))
        self.input_layernorm = CohereLayerNorm(config.hidden_size, config.layer_norm_eps, ctx.dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer."""
        normed = self.input_layernorm(hidden)
        return (
            hidden + self.self_attn(positions, normed) + self.mlp(normed)
        )  # transformers' order of the sums


class CohereModel(OlmoModel):  # layers that add their own residuals, then a final norm
    layer_class = CohereDecoderLayer

    def final_norm(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> nn.Module:
        return CohereLayerNorm(config.hidden_size, config.layer_norm_eps, ctx.dtype)


class CohereForCausalLM(DecoderForCausalLM):
    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, CohereModel)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab_size] float32, times logit_scale."""
        return super().compute_logits(hidden) * self.config.logit_scale
