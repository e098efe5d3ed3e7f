"""GPT-J (`GPTJForCausalLM`: EleutherAI/gpt-j-6b, GPT4All-J, Dolly v1), as transformers' modeling_gptj:
- a parallel block: attention and the MLP both read one LayerNorm's output (`ln_1`), their sum added to the
  residual (Phi's block, engine.model.models.phi);
- rope on the first `rotary_dim` dims of each head (64 of 256 in gpt-j-6b), turning interleaved pairs (GPT-J
  is where that style is named after): served as GLM's, the q/k rows reordered at load to halves
  (engine.model.models.glm), so the same rotary kernels apply;
- q/k/v and `out_proj` without biases; the ungated MLP `fc_in` -> GELU (`activation_function`) -> `fc_out`
  with biases; an LM head with a bias, untied by default;
- GPT-2's config names (n_embd, n_layer, n_head, n_positions, n_inner) and `transformer.` prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.norm import LayerNorm
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.glm import InterleavedRopeAttention
from engine.model.models.olmo import LayerNormDecoderModel
from engine.model.models.ungated_mlp import UngatedMLP
from engine.model_config import ModelConfig


class GPTJBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        self.self_attn = InterleavedRopeAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = UngatedMLP(config, ctx, join_prefix(prefix, "mlp"), ("fc_in", "fc_out"), bias=True)
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, ctx.dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer."""
        normed = self.input_layernorm(hidden)
        # transformers' order of the sums: (attention + MLP) + residual
        return self.self_attn(positions, normed) + self.mlp(normed) + hidden


class GPTJModel(LayerNormDecoderModel):
    layer_class = GPTJBlock


class GPTJForCausalLM(DecoderForCausalLM):
    # the checkpoint's names -> weir's, in this order
    checkpoint_renames = {
        "transformer.wte.": "model.embed_tokens.",
        "transformer.ln_f.": "model.norm.",
        "transformer.h.": "model.layers.",
        ".ln_1.": ".input_layernorm.",
        ".attn.out_proj.": ".self_attn.o_proj.",
        ".attn.": ".self_attn.",
    }
    # our module names -> the checkpoint's, for PEFT adapters' keys (in this order)
    lora_hub_names = {
        "model.layers.": "transformer.h.",
        ".self_attn.o_proj": ".attn.out_proj",
        ".self_attn.": ".attn.",
    }

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, GPTJModel)
