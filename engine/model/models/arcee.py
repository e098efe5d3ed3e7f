"""Arcee AFM (`ArceeForCausalLM`: AFM-4.5B): the Llama decoder (engine.model.models.llama) whose MLP has no
gate: `up_proj` -> ReLU² (relu(x) squared, `hidden_act` "relu2") -> `down_proj`, as transformers'
modeling_arcee builds it (NemotronMLP's form), biases by `mlp_bias`. Everything else is Llama's (its yarn
rope included)."""

from __future__ import annotations

from torch import nn

from engine.model.build_context import BuildContext
from engine.model.models.llama import LlamaForCausalLM
from engine.model.models.ungated_mlp import UngatedMLP
from engine.model_config import ModelConfig


def relu2_mlp(config: ModelConfig, layer_idx: int, ctx: BuildContext, prefix: str) -> nn.Module:
    del layer_idx  # every layer's MLP is alike
    return UngatedMLP(config, ctx, prefix, ("up_proj", "down_proj"), bias=config.mlp_bias)


class ArceeForCausalLM(LlamaForCausalLM):
    build_mlp = staticmethod(relu2_mlp)
    # up_proj is a layer of its own here, not the up half of a fused gate_up_proj
    packed_modules_mapping = {"qkv_proj": LlamaForCausalLM.packed_modules_mapping["qkv_proj"]}
