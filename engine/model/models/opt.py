"""OPT (`OPTForCausalLM`: facebook/opt-125m ... opt-66b, OPT-IML, Galactica's layout), as transformers'
modeling_opt: GPT-2's decoder (engine.model.models.gpt2: learned positions, no rope, LayerNorms before
attention and the MLP, a final one, the head tied to the embedding) with
- its learned positions offset by 2 (row p + 2 for position p) and `max_position_embeddings` of them;
- Linear weights (no Conv1D), q/k/v and `out_proj` with biases (`enable_bias`), the ungated MLP `fc1` -> ReLU
  (`activation_function`) -> `fc2`;
- the decoder under `model.decoder.` (or `decoder.` in a base OPTModel's file, the hub's opt-125m).
Refused at start, naming the field: `do_layer_norm_before` false (opt-350m's post-LayerNorm layers),
`word_embed_proj_dim` other than hidden_size (opt-350m's project_in / project_out),
`layer_norm_elementwise_affine` false and `_remove_final_layer_norm` true.
"""

from __future__ import annotations

from engine.model.build_context import BuildContext
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.gpt2 import GPT2Block, GPT2Model
from engine.model_config import ModelConfig


class OPTDecoderLayer(GPT2Block):
    mlp_names = ("fc1", "fc2")


class OPTModel(GPT2Model):
    layer_class = OPTDecoderLayer
    position_offset = 2


class OPTForCausalLM(DecoderForCausalLM):
    # a base OPTModel's file (the hub's opt-125m) names the decoder `decoder.`
    checkpoint_prefix = "model."
    # the checkpoint's names -> weir's, in this order (the decoder's final norm before the layers' own)
    checkpoint_renames = {
        "model.decoder.embed_tokens.": "model.embed_tokens.",
        "model.decoder.embed_positions.": "model.embed_positions.",
        "model.decoder.final_layer_norm.": "model.norm.",
        "model.decoder.layers.": "model.layers.",
        ".self_attn_layer_norm.": ".input_layernorm.",
        ".final_layer_norm.": ".post_attention_layernorm.",
        ".self_attn.out_proj.": ".self_attn.o_proj.",
        ".fc1.": ".mlp.fc1.",
        ".fc2.": ".mlp.fc2.",
    }
    # our module names -> the checkpoint's, for PEFT adapters' keys (in this order)
    lora_hub_names = {
        "model.layers.": "model.decoder.layers.",
        ".self_attn.o_proj": ".self_attn.out_proj",
        ".mlp.fc": ".fc",
    }

    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, OPTModel)
