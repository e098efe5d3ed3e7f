"""Architecture name (config.json `architectures`) -> model class.

Classes are imported lazily so that reading a config (engine.model_config) does not import torch.
Adding a family: write engine/models/<family>.py and add its architecture names here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# architecture -> (module, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("engine.model.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("engine.model.models.llama", "LlamaForCausalLM"),
    "MinistralForCausalLM": ("engine.model.models.llama", "LlamaForCausalLM"),
    "SeedOssForCausalLM": ("engine.model.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("engine.model.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("engine.model.models.llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("engine.model.models.moe", "MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("engine.model.models.moe", "MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("engine.model.models.moe", "MoeForCausalLM"),
    "Phi3ForCausalLM": ("engine.model.models.llama", "LlamaForCausalLM"),
    "SmolLM3ForCausalLM": ("engine.model.models.llama", "LlamaForCausalLM"),
    "GraniteForCausalLM": ("engine.model.models.llama", "LlamaForCausalLM"),
    "GraniteMoeForCausalLM": ("engine.model.models.moe", "MoeForCausalLM"),
    "GraniteMoeSharedForCausalLM": ("engine.model.models.moe", "MoeForCausalLM"),
    "GraniteMoeHybridForCausalLM": ("engine.model.models.moe", "MoeForCausalLM"),
    "OlmoForCausalLM": ("engine.model.models.olmo", "OlmoForCausalLM"),
    "StableLmForCausalLM": ("engine.model.models.stablelm", "StableLmForCausalLM"),
    "GPTNeoXForCausalLM": ("engine.model.models.gpt_neox", "GPTNeoXForCausalLM"),
    "GPT2LMHeadModel": ("engine.model.models.gpt2", "GPT2LMHeadModel"),
    "GPTBigCodeForCausalLM": ("engine.model.models.gpt2", "GPTBigCodeForCausalLM"),
    "GPTJForCausalLM": ("engine.model.models.gptj", "GPTJForCausalLM"),
    "OPTForCausalLM": ("engine.model.models.opt", "OPTForCausalLM"),
    "PhiForCausalLM": ("engine.model.models.phi", "PhiForCausalLM"),
    "Starcoder2ForCausalLM": ("engine.model.models.starcoder2", "Starcoder2ForCausalLM"),
    "Olmo2ForCausalLM": ("engine.model.models.olmo2", "Olmo2ForCausalLM"),
    "Olmo3ForCausalLM": ("engine.model.models.olmo2", "Olmo2ForCausalLM"),
    "OlmoeForCausalLM": ("engine.model.models.olmoe", "OlmoeForCausalLM"),
    "Exaone4ForCausalLM": ("engine.model.models.olmo2", "Exaone4ForCausalLM"),
    "GlmForCausalLM": ("engine.model.models.glm", "GlmForCausalLM"),
    "Glm4ForCausalLM": ("engine.model.models.glm", "Glm4ForCausalLM"),
    "HeliumForCausalLM": ("engine.model.models.glm", "GlmForCausalLM"),
    "ArceeForCausalLM": ("engine.model.models.arcee", "ArceeForCausalLM"),
    "ApertusForCausalLM": ("engine.model.models.arcee", "ApertusForCausalLM"),
    "Ernie4_5ForCausalLM": ("engine.model.models.glm", "GlmForCausalLM"),
    "CohereForCausalLM": ("engine.model.models.cohere", "CohereForCausalLM"),
    "Cohere2ForCausalLM": ("engine.model.models.cohere", "CohereForCausalLM"),
    "GemmaForCausalLM": ("engine.model.models.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("engine.model.models.gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("engine.model.models.gemma", "GemmaForCausalLM"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported model architecture {architecture}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    module_name, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(module_name), class_name)
