"""Arcee AFM (`ArceeForCausalLM`: AFM-4.5B) and Apertus (`ApertusForCausalLM`: Apertus-8B/70B): the Llama
decoder (engine.model.models.llama) whose MLP has no gate: `up_proj` -> activation -> `down_proj`, as
transformers' modeling_arcee / modeling_apertus build it (NemotronMLP's form). Arcee's activation is ReLU²
(relu(x) squared, `hidden_act` "relu2"), its MLP biases by `mlp_bias`, the rest Llama's (its yarn rope
included). Apertus's is xIELU with learned scalars per layer (engine.model.layers.xielu), no MLP bias, q/k
RMSNorms per head (as Qwen3's), and its two norms named `attention_layernorm` and `feedforward_layernorm`
(read as Llama's input_layernorm and post_attention_layernorm); its rope is llama3-scaled by default."""

from __future__ import annotations

from torch import nn

from engine.model.build_context import BuildContext
from engine.model.models.llama import LlamaForCausalLM
from engine.model.models.ungated_mlp import UngatedMLP
from engine.model_config import ModelConfig


def ungated_mlp(config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> nn.Module:
    del layer_idx  # every layer's MLP is alike
    return UngatedMLP(config, ctx, prefix, ("up_proj", "down_proj"), bias=config.mlp_bias)


class ArceeForCausalLM(LlamaForCausalLM):
    build_mlp = staticmethod(ungated_mlp)
    # up_proj is a layer of its own here, not the up half of a fused gate_up_proj
    packed_modules_mapping = {"qkv_proj": LlamaForCausalLM.packed_modules_mapping["qkv_proj"]}


class ApertusForCausalLM(ArceeForCausalLM):
    checkpoint_renames = {
        ".attention_layernorm.": ".input_layernorm.",
        ".feedforward_layernorm.": ".post_attention_layernorm.",
    }
