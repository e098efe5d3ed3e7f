"""Checkpoint loading: Hugging Face safetensors (one file, or shards listed in
model.safetensors.index.json) into a model built from engine.model.layers, through each parameter's
`weight_loader`.

Never unpickles: a checkpoint that only has *.bin / *.pt files is refused with the conversion recipe.
Name mapping is HF -> ours: q_proj/k_proj/v_proj and gate_proj/up_proj land as shards of the fused
parameters named in the model's `packed_modules_mapping`; a tensor the checkpoint stores fused under
our name (Phi-3's qkv_proj, gate_up_proj, quantized ones too) goes whole to the fused layer's loader,
which splits it into those shards; rotary `inv_freq` buffers are skipped;
with tied embeddings a stored lm_head.weight is ignored (the embedding is the head). A model's
`checkpoint_renames` (Mixtral: `.block_sparse_moe.` -> `.mlp.`) apply first (after its `checkpoint_prefix`,
GPT-2's `transformer.`, is put on names saved without it), and its `transposed_checkpoint_weights` (GPT-2's
Conv1D [in, out] weights) are transposed as they load; a layer with
`checkpoint_names()` (the stacked MoE experts, engine.model.layers.fused_moe) names every tensor it
loads itself, with the shard each fills, and every per-expert shard must be found (or the fused whole).

Both ways of filling a model (`load_weights`, `initialize_dummy_weights`) end with
`process_weights_after_loading(model)`: every module's method (`module.quant_method`, see
engine.model.quantization) gets its hook exactly once, after all its parameters hold their values.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.model.checkpoint_slice import CheckpointSlice
from engine.model.parameter import WeightShapeError, default_weight_loader
from engine.model.quantization.kv_cache import is_kv_scale_name

logger = logging.getLogger("weir.engine")

_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def find_safetensors_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index} lists shard {f.name}, which is missing from {model_dir}")
        if not files:
            raise ValueError(f"{index} has an empty weight_map")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for pattern in _PICKLE_PATTERNS for p in model_dir.glob(pattern))
    if pickled:
        raise ValueError(
            f"{model_dir} has only pickle checkpoint files ({', '.join(pickled)}); weir loads safetensors "
            "only and never unpickles. Convert once with transformers: "
            f"AutoModelForCausalLM.from_pretrained({str(model_dir)!r}).save_pretrained(OUT_DIR, "
            "safe_serialization=True), then serve OUT_DIR"
        )
    raise ValueError(f"no *.safetensors weight files in {model_dir}")


def _checkpoint_name_to_param(name: str, packed: dict[str, list[tuple[str, Any]]]) -> tuple[str, Any, bool]:
    """HF tensor name -> (our parameter name, shard_id, is_packed)."""
    for fused, parts in packed.items():
        for part, shard_id in parts:
            token = f".{part}."
            if token in name:
                return name.replace(token, f".{fused}."), shard_id, True
    return name, None, False


def _layer_checkpoint_names(model: nn.Module) -> dict[str, tuple[str, Any]]:
    """Checkpoint tensor name -> (our parameter name, shard_id), from layers that list their own."""
    names: dict[str, tuple[str, Any]] = {}
    for module_name, module in model.named_modules():
        listing = getattr(module, "checkpoint_names", None)
        if callable(listing):
            for tensor_name, (attr, shard_id) in listing().items():
                names[tensor_name] = (f"{module_name}.{attr}" if module_name else attr, shard_id)
    return names


def rename_fragments(name: str, renames: dict[str, str]) -> str:
    """`name` with each key of `renames` replaced by its value, in the dict's order (checkpoint names ->
    ours at load; ours -> the checkpoint's in messages and for PEFT adapters' keys)."""
    for theirs, ours in renames.items():
        name = name.replace(theirs, ours)
    return name


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Load every parameter of `model` from the safetensors checkpoint in `model_dir`.

    Raises ValueError naming the parameter, the file and both shapes on a mismatch, and the
    parameter (plus the checkpoint tensor it expected) when something is missing.
    """
    files = find_safetensors_files(model_dir)
    packed: dict[str, list[tuple[str, Any]]] = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    renames: dict[str, str] = getattr(model, "checkpoint_renames", {})
    # GPT-2's decoder prefix, which a base model's file leaves out: added first where missing
    prefix: str | None = getattr(model, "checkpoint_prefix", None)
    # Conv1D weights ([in, out]: GPT-2's), by our name: transposed to [out, in] as they load
    transposed: tuple[str, ...] = getattr(model, "transposed_checkpoint_weights", ())
    layer_names = _layer_checkpoint_names(model)
    loaded: dict[str, set[Any]] = {}
    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if (
                    "rotary_emb.inv_freq" in name
                    or "rotary_emb.cos_cached" in name
                    or "rotary_emb.sin_cached" in name
                ):
                    continue
                if tied and name == "lm_head.weight":
                    continue
                if is_kv_scale_name(name):  # an fp8 KV cache's scales: not parameters (kv_cache.py)
                    continue
                full = name
                if prefix is not None and not name.startswith((prefix, "lm_head.")):
                    full = prefix + name
                ours = rename_fragments(full, renames)
                if ours in layer_names:
                    param_name, shard_id = layer_names[ours]
                else:
                    param_name, shard_id, _ = _checkpoint_name_to_param(ours, packed)
                param = params.get(param_name)
                if param is None:
                    unexpected.append(name)
                    continue
                loader = getattr(param, "weight_loader", default_weight_loader)
                if ours.endswith(transposed):  # whole, then transposed (no lazy per-rank slice)
                    tensor: torch.Tensor | CheckpointSlice = f.get_tensor(name).t().contiguous()
                else:
                    tensor = _checkpoint_tensor(f, name, loader)
                try:
                    loader(param, tensor, shard_id)
                except WeightShapeError as e:
                    raise ValueError(
                        f"shape mismatch for parameter {param_name} (checkpoint tensor {name} in {file.name}): "
                        f"checkpoint has {tuple(e.got)}, the model expects {tuple(e.expected)}"
                    ) from None
                loaded.setdefault(param_name, set()).add(shard_id)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        logger.warning(
            "ignored %d checkpoint tensors the model has no parameter for: %s", len(unexpected), shown
        )
    hub_names = {ours: theirs for theirs, ours in renames.items()}
    _check_complete(params, loaded, packed, files, layer_names, hub_names)
    process_weights_after_loading(model)


def _checkpoint_tensor(f: Any, name: str, loader: Any) -> torch.Tensor | CheckpointSlice:
    """What `loader` gets for tensor `name`: a lazy slice when it belongs to a tensor-parallel layer
    that narrows before copying (each rank then reads only its shard), else the whole tensor."""
    # a bound method's layer, or the layer a loader closure names as its owner (`slice_owner`)
    owner = getattr(loader, "__self__", None) or getattr(loader, "slice_owner", None)
    if getattr(owner, "accepts_checkpoint_slices", False) and getattr(owner, "tp_size", 1) > 1:
        return CheckpointSlice(f.get_slice(name))
    return f.get_tensor(name)


def process_weights_after_loading(model: nn.Module) -> None:
    """Run each layer's method hook once (repacking, transposes, scale fusion), layer by layer."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def _check_complete(
    params: dict[str, nn.Parameter],
    loaded: dict[str, set[Any]],
    packed: dict[str, list[tuple[str, Any]]],
    files: list[Path],
    layer_names: dict[str, tuple[str, Any]],
    hub_names: dict[str, str],  # our name fragment -> the checkpoint's (the renames reversed)
) -> None:
    searched = ", ".join(f.name for f in files)
    shards_of: dict[str, dict[Any, str]] = {}  # parameter -> {shard_id: checkpoint tensor}, per-shard layers
    for tensor_name, (param_name, shard_id) in layer_names.items():
        if shard_id is not None:
            shards_of.setdefault(param_name, {})[shard_id] = tensor_name
    for param_name in params:
        done = loaded.get(param_name, set())
        if None in done:  # loaded whole (also a fused checkpoint tensor for a fused parameter)
            continue
        fused = next((k for k in packed if f".{k}." in param_name), None)
        if param_name in shards_of:
            for shard_id, tensor_name in shards_of[param_name].items():
                if shard_id not in done:
                    raise ValueError(
                        f"missing weight for parameter {param_name} (shard {shard_id!r}): checkpoint tensor "
                        f"{rename_fragments(tensor_name, hub_names)} not found in {searched}"
                    )
        elif fused is not None:
            for part, shard_id in packed[fused]:
                if shard_id not in done:
                    hf_name = rename_fragments(param_name.replace(f".{fused}.", f".{part}."), hub_names)
                    raise ValueError(
                        f"missing weight for parameter {param_name} (shard {shard_id!r}): checkpoint tensor "
                        f"{hf_name} not found in {searched}"
                    )
        elif not done:
            raise ValueError(
                f"missing weight for parameter {param_name}: checkpoint tensor "
                f"{rename_fragments(param_name, hub_names)} not found in {searched}"
            )


def initialize_dummy_weights(model: nn.Module, low: float = -1e-3, high: float = 1e-3, seed: int = 0) -> None:
    """Random weights without reading any file (load_format="dummy", for benchmarks and tests).

    Small uniform values keep activations finite in bf16; RMSNorm weights are set to 1 so hidden
    states keep a realistic scale. Integer parameters (a method's packed quantized weights) get random
    values over their dtype's whole range: every bit pattern is a valid packed weight, and uniform_ is
    undefined on integer tensors. Then the methods' post-load hooks run, as after a real load.
    """
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            # a layer's valid placeholder (GPTQ's g_idx; Gemma's norms: 0, their identity scale)
            dummy_init = getattr(param, "dummy_init", None)
            if dummy_init is not None:
                param.copy_(dummy_init())
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            generator = generators[param.device]
            if param.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # no uniform_ kernel for fp8
                drawn = torch.empty(param.shape, device=param.device).uniform_(low, high, generator=generator)
                param.copy_(drawn)
            elif param.is_floating_point():
                param.uniform_(low, high, generator=generator)
            elif param.dtype == torch.bool:
                param.copy_(torch.randint(0, 2, param.shape, generator=generator, device=param.device) == 1)
            else:
                info = torch.iinfo(param.dtype)
                param.copy_(
                    torch.randint(
                        info.min,
                        info.max,
                        param.shape,
                        generator=generator,
                        dtype=param.dtype,
                        device=param.device,
                    )
                )
    process_weights_after_loading(model)
