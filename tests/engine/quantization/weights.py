"""Load a quantized checkpoint into weir's model (no engine) and compare every layer's dequantized
weight with the reference checkpoint's float32 weights (a MoE layer's stacked experts with every
expert's tensors): exact, since both compute (q - z) * s in float32 from fp16 scales. Cheap, so every
option combination gets it; engine parity runs on a few."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.model.build_context import BuildContext
from engine.model.layers.fused_moe import FusedMoE
from engine.model.models.llama import LlamaForCausalLM
from engine.model.models.registry import get_model_class
from engine.model.quantization.common import dequantize
from engine.model.quantization.squeezellm import dequantize_lut
from engine.model.weight_loader import load_weights
from engine.model_config import ModelConfig
from ops.reference import dequantize_fp8_experts, dequantize_int_experts

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def load_quantized(model_dir: Path, quant_config: object) -> LlamaForCausalLM:
    config = ModelConfig.from_pretrained(str(model_dir), dtype="float32", device="cpu")
    model_class = get_model_class(config.architecture)  # Llama, or the MoE families
    model = model_class(config, BuildContext(dtype=torch.float32, quant_config=quant_config))
    load_weights(model, model_dir)
    return model


def _expert_weights(module: FusedMoE) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13, w2) [E, N, K] float32 as the fused MoE op computes with them."""
    if hasattr(module, "w13_codes"):  # integer experts
        bits = module.quant_method.fmt.bits
        w13, w2 = (
            dequantize_int_experts(
                getattr(module, f"{p}_codes"),
                getattr(module, f"{p}_zeros"),
                getattr(module, f"{p}_scales"),
                bits,
                torch.float32,
            )
            for p in ("w13", "w2")
        )
        if getattr(module, "w13_perm", None) is None:
            return w13, w2
        # act order: stored in group order (wna16_moe.fold_act_order); put the checkpoint's order back
        shard = module.intermediate_per_partition
        w13_orig, w2_orig = torch.empty_like(w13), torch.empty_like(w2)
        for e in range(module.num_experts):
            columns, channels = module.w13_perm[e].long(), module.w2_perm[e].long()
            rows = torch.cat([channels, channels + shard])
            w13_orig[e, rows[:, None], columns[None, :]] = w13[e]
            w2_orig[e][:, channels] = w2[e]
        return w13_orig, w2_orig
    if module.w13_weight.dtype != torch.float8_e4m3fn:
        return module.w13_weight, module.w2_weight
    block = module.quant_method.block_shape
    return tuple(  # type: ignore[return-value]
        dequantize_fp8_experts(
            getattr(module, f"{p}_weight"), getattr(module, f"{p}_scale"), block, torch.float32
        )
        for p in ("w13", "w2")
    )


def _reference_experts(module: FusedMoE, ref: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference checkpoint's per-expert tensors stacked as the layer stacks them."""
    gate, up, down = module.expert_names
    base = module.checkpoint_prefix
    w13 = torch.stack(
        [
            torch.cat([ref[f"{base}.{e}.{gate}.weight"], ref[f"{base}.{e}.{up}.weight"]])
            for e in range(module.num_experts)
        ]
    )
    w2 = torch.stack([ref[f"{base}.{e}.{down}.weight"] for e in range(module.num_experts)])
    return w13, w2


def assert_weights_match_reference(model: LlamaForCausalLM, reference_dir: Path) -> int:
    """Every linear layer's effective weight equals the reference's; returns how many were quantized."""
    ref = load_file(str(reference_dir / "model.safetensors"))
    quantized = 0
    for name, module in model.named_modules():
        if not hasattr(module, "quant_method"):
            continue
        if isinstance(module, FusedMoE):  # the stacked experts: every expert's [gate; up] and down
            for got, expected in zip(_expert_weights(module), _reference_experts(module, ref), strict=True):
                assert got.dtype == torch.float32
                assert torch.equal(got, expected), name
            quantized += hasattr(module, "w13_codes") or module.w13_weight.dtype == torch.float8_e4m3fn
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
