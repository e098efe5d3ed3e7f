"""Load a quantized checkpoint into weir's model (no engine) and compare every layer's dequantized
weight with the reference checkpoint's float32 weights: exact, since both compute (q - z) * s in
float32 from fp16 scales. Cheap, so every option combination gets it; engine parity runs on a few."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.model.build_context import BuildContext
from engine.model.models.llama import LlamaForCausalLM
from engine.model.quantization.common import dequantize
from engine.model.quantization.squeezellm import dequantize_lut
from engine.model.weight_loader import load_weights
from engine.model_config import ModelConfig

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def load_quantized(model_dir: Path, quant_config: object) -> LlamaForCausalLM:
    config = ModelConfig.from_pretrained(str(model_dir), dtype="float32", device="cpu")
    model = LlamaForCausalLM(config, BuildContext(dtype=torch.float32, quant_config=quant_config))
    load_weights(model, model_dir)
    return model


def assert_weights_match_reference(model: LlamaForCausalLM, reference_dir: Path) -> int:
    """Every linear layer's effective weight equals the reference's; returns how many were quantized."""
    ref = load_file(str(reference_dir / "model.safetensors"))
    quantized = 0
    for name, module in model.named_modules():
        if not hasattr(module, "quant_method"):
            continue
        head, _, last = name.rpartition(".")
        # the checkpoint's modules behind the layer: fused already (Phi-3) or fused by weir
        parts = (last,) if f"{name}.weight" in ref else FUSED.get(last, (last,))
        expected = torch.cat([ref[f"{head}.{p}.weight"] for p in parts])  # [out, in]
        if hasattr(module, "lookup_table"):  # SqueezeLLM
            got = dequantize_lut(module.codes, module.lookup_table, torch.float32)
            quantized += 1
        elif hasattr(module, "codes"):  # GPTQ, AWQ
            got = dequantize(module.codes, module.zeros, module.scales, module.g_idx, torch.float32)
            if module.perm is not None:  # columns stored in group order: put them back
                unpermuted = torch.empty_like(got)
                unpermuted[:, module.perm] = got
                got = unpermuted
            quantized += 1
        elif module.weight.dtype == torch.float8_e4m3fn:
            scale = module.weight_scale
            got = module.weight.float() * (scale[:, None] if scale.dim() == 1 else scale)
            quantized += 1
        else:
            got = module.weight
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), name
    return quantized
