"""StarCoder2 (`Starcoder2ForCausalLM`: starcoder2-3b, -7b, -15b): the Llama attention
(engine.model.models.llama) with transformers' modeling_starcoder2's differences:
- a plain two-layer MLP, `c_fc` -> GELU -> `c_proj` (no gate), the tanh-approximate GELU of its
  checkpoints (`hidden_act` "gelu_pytorch_tanh"; exact "gelu" too);
- biases on q/k/v, o_proj and both MLP projections when `use_bias` (the default);
- LayerNorms with weight and bias (`norm_epsilon`) before attention, before the MLP and at the end;
- every layer windowed when `sliding_window` is set (the released checkpoints: 4,096), as Mistral's;
- the embedding tied to the LM head by default (Starcoder2Config's `tie_word_embeddings` True).
Its dropouts are identities at inference.
"""

from __future__ import annotations

from torch import nn

from engine.model.build_context import BuildContext
from engine.model.models.causal_lm import DecoderForCausalLM
from engine.model.models.olmo import LayerNormDecoderModel
from engine.model.models.stablelm import StableLmDecoderLayer
from engine.model.models.ungated_mlp import UngatedMLP
from engine.model_config import ModelConfig


class Starcoder2DecoderLayer(StableLmDecoderLayer):  # its LayerNorms and residuals, another MLP
    def build_mlp(self, config: ModelConfig, ctx: BuildContext, prefix: str) -> nn.Module:
        return UngatedMLP(config, ctx, prefix, ("c_fc", "c_proj"), config.mlp_bias)


class Starcoder2Model(LayerNormDecoderModel):
    layer_class = Starcoder2DecoderLayer


class Starcoder2ForCausalLM(DecoderForCausalLM):
    def __init__(self, config: ModelConfig, ctx: BuildContext | None = None, prefix: str = "") -> None:
        super().__init__(config, ctx or BuildContext(), prefix, Starcoder2Model)
