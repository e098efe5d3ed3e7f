"""GPT-2 (`GPT2LMHeadModel`: gpt2, gpt2-medium/large/xl, distilgpt2, DialoGPT and their fine-tunes), as
transformers' modeling_gpt2:
- learned absolute position embeddings (`wpe`, `n_positions` of them) added to the token embeddings, and
  no rotary embedding (the attention's rotary table is the identity, as SmolLM3's NoPE layers'); so
  max_model_len cannot pass `n_positions`;
- LayerNorms with weight and bias (`layer_norm_epsilon`) before attention and the MLP (`ln_1`, `ln_2`), a
  sequential residual, a final `ln_f`;
- q, k and v in one `attn.c_attn` tensor whose columns are [q | k | v], biases on every projection, the
  ungated MLP `c_fc` -> GELU (`activation_function`, the tanh form by default) -> `c_proj`;
- every projection a Conv1D: its checkpoint weight is [in, out], transposed at load to the [out, in] of
  weir's linears (`transposed_checkpoint_weights`); so only float checkpoints are served (engine.config);
- the LM head tied to `wte`; checkpoints name the decoder `transformer.` (what save_pretrained writes) or
  nothing (the original hub files, which also hold `attn.bias` mask buffers: ignored with a warning).
`scale_attn_weights` false gives the softmax scale 1 (read by engine.model_config); a per-layer scale
(`scale_attn_by_inverse_layer_idx`) is refused at start. GPTBigCode (StarCoder) is the same model with multi-query
attention and Linear weights (below).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.build_context import BuildContext, join_prefix
from engine.model.layers.norm import LayerNorm
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.llama import LlamaAttention
from engine.model.models.olmo import LayerNormDecoderModel
from engine.model.models.ungated_mlp import UngatedMLP
from engine.model_config import ModelConfig


class GPT2Block(nn.Module):
    """LayerNorm, attention, residual; LayerNorm, the ungated MLP, residual (OPT's layer too)."""

    mlp_names = ("c_fc", "c_proj")  # the MLP's (up, down) checkpoint names

    def __init__(self, config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> None:
        super().__init__()
        eps, dtype = config.layer_norm_eps, ctx.dtype
        self.self_attn = LlamaAttention(config, layer_idx, ctx, join_prefix(prefix, "self_attn"))
        self.mlp = UngatedMLP(config, ctx, join_prefix(prefix, "mlp"), self.mlp_names, bias=config.mlp_bias)
        self.input_layernorm = LayerNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: the residual stream [num_tokens, hidden] -> the same after this layer."""
        hidden = self.self_attn(positions, self.input_layernorm(hidden)) + hidden
        return self.mlp(self.post_attention_layernorm(hidden)) + hidden


class GPT2Model(LayerNormDecoderModel):
    layer_class = GPT2Block
    position_offset = 0  # OPT's table starts 2 rows in (its rows 0 and 1 are never read)

    def __init__(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> None:
        super().__init__(config, ctx, prefix)
        # [max_position_embeddings + offset, hidden], replicated on every rank (positions are not split)
        rows = config.max_position_embeddings + self.position_offset
        self.embed_positions = nn.Embedding(rows, config.hidden_size, dtype=ctx.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) + self.embed_positions(positions + self.position_offset)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)

    def final_norm(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_eps, ctx.dtype)


class GPT2LMHeadModel(DecoderForCausalLM):
    # a base GPT2Model's file (the original hub checkpoints) names the decoder without the prefix
    checkpoint_prefix = "transformer."
    # the checkpoint's names -> weir's, in this order
    checkpoint_renames = {
        "transformer.wte.": "model.embed_tokens.",
        "transformer.wpe.": "model.embed_positions.",
        "transformer.ln_f.": "model.norm.",
        "transformer.h.": "model.layers.",
        ".ln_1.": ".input_layernorm.",
        ".ln_2.": ".post_attention_layernorm.",
        ".attn.c_attn.": ".self_attn.qkv_proj.",
        ".attn.c_proj.": ".self_attn.o_proj.",
    }
    # Conv1D weights ([in, out]) by weir's name after the renames: transposed as they load
    transposed_checkpoint_weights = (
        ".self_attn.qkv_proj.weight",
        ".self_attn.o_proj.weight",
        ".mlp.c_fc.weight",
        ".mlp.c_proj.weight",
    )

    # LoRA: PEFT adapts c_attn whole (one A, B's rows [q; k; v]) under the checkpoint's names
    checkpoint_fused_modules = ("qkv_proj",)
    lora_hub_names = {
        "model.layers.": "transformer.h.",
        ".self_attn.qkv_proj": ".attn.c_attn",
        ".self_attn.o_proj": ".attn.c_proj",
    }

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, GPT2Model)


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    """StarCoder / SantaCoder / WizardCoder (`GPTBigCodeForCausalLM`): GPT-2's model with multi-query attention
    (one K/V head: `c_attn`'s rows are [q | k | v], hidden + 2 x head_dim of them) and Linear weights (no
    Conv1D, so nothing is transposed), GELU's tanh form by default."""

    transposed_checkpoint_weights = ()
