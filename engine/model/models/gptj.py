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

from engine.model.build_context import BuildContext
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.glm import InterleavedRopeAttention
from engine.model.models.olmo import LayerNormDecoderModel
from engine.model.models.phi import PhiDecoderLayer
from engine.model_config import ModelConfig


class GPTJBlock(PhiDecoderLayer):
    attention_class = InterleavedRopeAttention
    mlp_names = ("fc_in", "fc_out")


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
