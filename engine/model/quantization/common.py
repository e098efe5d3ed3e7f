"""What the weight-only integer formats (GPTQ, AWQ) share: the skip list, a loader that unpacks
packed zero points at load, the layout their post-load hooks end in (`register_weight_only`), and the
dequantize-then-matmul reference every method's `apply` uses on CPU; on CUDA the layers run the
Triton kernels instead (engine.model.quantization.wna16).

Zero points are packed along the output dim but grouped along the input dim, two packings on one
tensor that the parameter metadata (one packed_dim) cannot describe; so the loader unpacks them as
they arrive and the parameter holds one int32 per (group, output channel), packed only by group.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.parameter import WeightLoader, WeightShapeError
from engine.model.quantization.wna16 import (
    apply_wna16,
    apply_wna16_silu_mul,
    register_kernel_layout,
    triton_wna16_available,
    use_wna16_kernels,
)

# Fused layer -> the checkpoint modules behind it (the Llama family's packed_modules_mapping).
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def is_skipped(prefix: str, skip: tuple[str, ...]) -> bool:
    """Whether the checkpoint left the layer `prefix` unquantized: a skip entry is a substring of the
    module name (AWQ's modules_to_not_convert, FP8's ignored_layers, as their tools match them). A
    fused layer is skipped when all its checkpoint modules are, or when an entry names the fused module
    itself (Phi-3's checkpoints store qkv_proj and gate_up_proj fused); a mix cannot be one method."""
    if not skip:
        return False
    head, _, last = prefix.rpartition(".")
    parts = FUSED_MODULES.get(last)
    if parts is None:
        return any(s in prefix for s in skip)
    if any(last in s and s in prefix for s in skip):  # "qkv_proj", "layers.0.mlp.gate_up_proj", ...
        return True
    names = [f"{head}.{p}" if head else p for p in parts]
    hits = [any(s in n for s in skip) for n in names]
    if any(hits) and not all(hits):
        raise ValueError(
            f"the checkpoint quantizes only some of {', '.join(names)}, which weir runs fused as "
            f"{prefix}: skip all of them or none"
        )
    return all(hits)


def is_ignored(prefix: str, ignore: tuple[str, ...]) -> bool:
    """Whether compressed-tensors' `ignore` list keeps the layer `prefix` unquantized: an entry is a
    module name (matched as a suffix) or `re:PATTERN` (re.match on the name). A fused layer is ignored
    when all its checkpoint modules are, or when an entry names the fused module itself (Phi-3's
    checkpoints store qkv_proj and gate_up_proj fused); a mix cannot be one method."""
    if not ignore:
        return False
    head, _, last = prefix.rpartition(".")
    names = [f"{head}.{p}" if head else p for p in FUSED_MODULES.get(last, (last,))]

    def hit(name: str) -> bool:
        for entry in ignore:
            if entry.startswith("re:"):
                if re.match(entry[3:], name):
                    return True
            elif name == entry or name.endswith("." + entry):
                return True
        return False

    if last in FUSED_MODULES and hit(prefix):
        return True
    hits = [hit(n) for n in names]
    if any(hits) and not all(hits):
        raise ValueError(
            f"the checkpoint's ignore list keeps only some of {', '.join(names)} unquantized, which weir runs "
            f"fused as {prefix}: ignore all of them or none"
        )
    return all(hits)


def experts_skipped(names: list[str], prefix: str, skipped: Callable[[str], bool]) -> bool:
    """Whether the checkpoint left a MoE layer's experts (the hub's module names, every expert's
    projections) unquantized: all of them or none, since weir stacks them into one tensor per layer."""
    hits = [skipped(n) for n in names]
    if any(hits) and not all(hits):
        kept = next(n for n, hit in zip(names, hits, strict=True) if hit)
        quantized = next(n for n, hit in zip(names, hits, strict=True) if not hit)
        raise ValueError(
            f"the checkpoint keeps only some experts of {prefix} unquantized ({kept} but not {quantized}), "
            "which weir runs stacked: skip all of them or none"
        )
    return bool(hits) and all(hits)


def unpacking_loader(
    loader: WeightLoader, unpack: Callable[[torch.Tensor], torch.Tensor], name: str
) -> WeightLoader:
    """The layer's loader, fed the unpacked checkpoint tensor (the parameter holds it unpacked)."""

    def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if loaded_weight.dtype != torch.int32:
            raise ValueError(f"{name}: packed zero points must be int32; got {loaded_weight.dtype}")
        loader(param, unpack(loaded_weight).to(torch.int32), shard_id)

    return load


def same_on_every_shard_loader(name: str) -> WeightLoader:
    """For a tensor each fused checkpoint module stores in full and that must agree across them (GPTQ's
    g_idx: q/k/v share their input, hence their act order): the first copy loads, the rest must match."""

    def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if tuple(param.shape) != tuple(loaded_weight.shape):
            raise WeightShapeError(tuple(param.shape), tuple(loaded_weight.shape))
        seen: set = getattr(param, "_loaded_shards", None) or set()
        param._loaded_shards = seen  # type: ignore[attr-defined]
        if seen and not torch.equal(param.data, loaded_weight.to(param.device, param.dtype)):
            raise ValueError(
                f"{name} differs between the checkpoint modules fused into one layer (shard {shard_id!r}); "
                "weir needs them equal to run the modules fused"
            )
        param.data.copy_(loaded_weight)
        seen.add(shard_id)

    return load


def dequantize(
    q: torch.Tensor,  # [out, in] uint8 codes
    zeros: torch.Tensor,  # [out, groups] float32
    scales: torch.Tensor,  # [out, groups] float32
    g_idx: torch.Tensor | None,  # [in] int64 group of each input column; None: contiguous groups
    dtype: torch.dtype,
) -> torch.Tensor:  # [out, in] in dtype
    """w = (q - zero[group]) * scale[group], in float32 (exact for fp16 scales and 8-bit codes),
    then cast: the reference every weight-only integer method computes."""
    out_features, in_features = q.shape
    groups = scales.shape[1]
    if g_idx is None:
        codes = q.view(out_features, groups, in_features // groups).float()
        w = (codes - zeros.unsqueeze(2)) * scales.unsqueeze(2)
        return w.view(out_features, in_features).to(dtype)
    w = (q.float() - zeros[:, g_idx]) * scales[:, g_idx]
    return w.to(dtype)


def register_weight_only(
    layer: nn.Module,
    codes: torch.Tensor,  # [out, in] uint8, input columns in `perm` order
    zeros: torch.Tensor,  # [out, G] float32
    scales: torch.Tensor,  # [out, G] float32
    perm: torch.Tensor | None,  # [in] int64: x's columns to gather per call (act order); None: as is
    g_idx: torch.Tensor | None,  # [in] int64 group of each column when groups are uneven; None: contiguous
    bits: int,
) -> None:
    """The GPTQ/AWQ post-load hooks' last step: the Triton kernels' packed layout on a GPU that runs
    them (engine.model.quantization.wna16), else the reference's (codes, zeros, scales, g_idx, perm)."""
    out_features, in_features = codes.shape
    if use_wna16_kernels(
        codes.device.type, triton_wna16_available(), g_idx is not None, bits, in_features, out_features
    ):
        register_kernel_layout(layer, codes, zeros, scales, perm, bits)
        return
    layer.wna16_bits = 0  # the reference path
    layer.register_buffer("codes", codes)
    layer.register_buffer("zeros", zeros)
    layer.register_buffer("scales", scales)
    layer.register_buffer("perm", perm)
    layer.register_buffer("g_idx", g_idx)


def silu_mul_weight_only(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """LinearMethodBase.apply_silu_mul for the weight-only layers: the GEMV's gated launch where the
    layer runs the Triton kernels and the batch takes the GEMV, else None."""
    return apply_wna16_silu_mul(layer, x) if layer.wna16_bits else None


def apply_weight_only(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x w^T + b for a layer holding codes/zeros/scales/g_idx/perm (GPTQ, AWQ after loading):
    [tokens, in] -> [tokens, out]. With `perm` the codes' input columns are in group order, so x's
    columns are gathered the same way. Layers in the kernel layout run the Triton kernels."""
    if layer.wna16_bits:
        return apply_wna16(layer, x, bias)
    if layer.perm is not None:
        x = x.index_select(-1, layer.perm)  # [tokens, in] in the codes' column order
    w = dequantize(layer.codes, layer.zeros, layer.scales, layer.g_idx, x.dtype)  # [out, in]
    return F.linear(x, w, bias)
