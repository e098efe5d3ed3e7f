"""Reading a compressed-tensors `quantization_config` (the fields of compressed-tensors'
quantization/quant_config.py QuantizationConfig and quant_args.py QuantizationArgs) into one of
weir's layer configs, refusing whatever weir would not run exactly, with the field's path and value
(`config.json quantization_config: config_groups.group_0.weights.symmetric=False is not supported`)."""

from __future__ import annotations

from typing import Any

from engine.model.quantization.base import QuantizationConfig
from engine.model.quantization.compressed_tensors import (
    CT_GROUP_SIZES,
    CT_INT_BITS,
    CompressedTensorsUnquantizedConfig,
    CompressedTensorsWNA16Config,
)
from engine.model.quantization.fp8 import Fp8Config


def _refuse(source: str, path: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{source}: {path}={value!r} is not supported ({why})")


def compressed_tensors_config(raw: dict[str, Any], source: str) -> QuantizationConfig:
    sparsity = raw.get("sparsity_config")
    if sparsity and (sparsity.get("format") or "dense") != "dense":
        raise _refuse(source, "sparsity_config.format", sparsity.get("format"), "sparse weights")
    _check_kv_cache_scheme(raw.get("kv_cache_scheme"), source)
    groups = raw.get("config_groups") or {}
    if not groups:
        return CompressedTensorsUnquantizedConfig()  # only the KV cache is quantized
    if len(groups) != 1:
        raise _refuse(source, "config_groups", sorted(groups), "one scheme for every Linear layer")
    ((name, group),) = groups.items()
    at = f"config_groups.{name}"
    targets = group.get("targets") or []
    if targets != ["Linear"]:
        raise _refuse(source, f"{at}.targets", targets, "weir supports ['Linear']")
    if group.get("output_activations"):
        raise _refuse(source, f"{at}.output_activations", group["output_activations"], "output quantization")
    weights = group.get("weights") or {}
    fmt = group.get("format") or raw.get("format")
    ignore = tuple(raw.get("ignore") or ())
    if weights.get("dynamic") is True:
        raise _refuse(source, f"{at}.weights.dynamic", True, "static weights from the checkpoint")
    actorder = weights.get("actorder")
    # "weight" (alias "static") only ordered the calibration: the layout is the plain one. "group"
    # (alias "dynamic", or true in older files) permutes the groups through weight_g_idx.
    if actorder not in (None, False, "weight", "static", "group", "dynamic", True):
        raise _refuse(source, f"{at}.weights.actorder", actorder, "'group', 'weight' or none")
    act_order = actorder in ("group", "dynamic", True)
    symmetric = weights.get("symmetric", True) is not False
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    acts = group.get("input_activations")
    if fmt == "pack-quantized":
        if kind != "int" or bits not in CT_INT_BITS:
            raise _refuse(source, f"{at}.weights.num_bits", bits, "int 4 or 8 when pack-quantized")
        if acts:
            raise _refuse(
                source, f"{at}.input_activations", acts, "weight-only W4A16/W8A16 when pack-quantized"
            )
        if act_order and strategy != "group":
            raise _refuse(
                source, f"{at}.weights.actorder", actorder, "act order by group needs strategy 'group'"
            )
        if strategy == "channel":
            return CompressedTensorsWNA16Config(bits, -1, ignore, symmetric)
        if strategy == "group" and weights.get("group_size") in CT_GROUP_SIZES:
            return CompressedTensorsWNA16Config(bits, weights["group_size"], ignore, symmetric, act_order)
        if strategy == "group":
            raise _refuse(source, f"{at}.weights.group_size", weights.get("group_size"), "32, 64 or 128")
        raise _refuse(source, f"{at}.weights.strategy", strategy, "group or channel when pack-quantized")
    if fmt == "float-quantized":
        if kind != "float" or bits != 8:
            raise _refuse(source, f"{at}.weights.num_bits", bits, "float 8 (e4m3) when float-quantized")
        if not symmetric:
            raise _refuse(source, f"{at}.weights.symmetric", False, "symmetric FP8 weights (no zero points)")
        if act_order:
            raise _refuse(source, f"{at}.weights.actorder", actorder, "no act order by group for FP8 weights")
        static = bool(acts) and not acts.get("dynamic")
        if static and acts.get("strategy") != "tensor":
            raise _refuse(
                source, f"{at}.input_activations.strategy", acts.get("strategy"), "static scales per tensor"
            )
        if strategy in ("tensor", "channel"):
            return Fp8Config(
                from_checkpoint=True, skip_modules=ignore, ignore_is_ct=True, static_activations=static
            )
        if strategy == "block":
            block = weights.get("block_structure")
            if not (
                isinstance(block, list)
                and len(block) == 2
                and all(isinstance(b, int) and b > 0 for b in block)
            ):
                raise _refuse(source, f"{at}.weights.block_structure", block, "two positive integers")
            return Fp8Config(
                from_checkpoint=True,
                weight_block_size=(block[0], block[1]),
                skip_modules=ignore,
                block_scale_name="weight_scale",
                ignore_is_ct=True,
                static_activations=static,
            )
        raise _refuse(
            source, f"{at}.weights.strategy", strategy, "tensor, channel or block when float-quantized"
        )
    raise _refuse(source, "format", fmt, "pack-quantized or float-quantized")


def _check_kv_cache_scheme(scheme: dict[str, Any] | None, source: str) -> None:
    if not scheme:
        return
    if scheme.get("type") != "float" or scheme.get("num_bits") != 8:
        raise _refuse(source, "kv_cache_scheme.num_bits", scheme.get("num_bits"), "8-bit float KV caches")
    # attn_head: k_scale / v_scale of one value per KV head (engine.model.quantization.kv_cache)
    if scheme.get("strategy", "tensor") not in ("tensor", "attn_head"):
        raise _refuse(
            source,
            "kv_cache_scheme.strategy",
            scheme["strategy"],
            "one scale per tensor or per attention head",
        )
    if scheme.get("dynamic"):
        raise _refuse(source, "kv_cache_scheme.dynamic", True, "static scales from the checkpoint")
