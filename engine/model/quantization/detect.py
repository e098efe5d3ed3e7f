"""Which quantization a checkpoint uses, read once at start (EngineConfig.resolve) from where the
ecosystem's tools write it, and checked against what weir runs: anything else is refused here, with
the file, field and value, rather than run wrongly.

Sources, first found wins: config.json `quantization_config` (transformers, GPTQModel, AutoAWQ,
llm-compressor), then a legacy quantize_config.json (AutoGPTQ: GPTQ), then quant_config.json (AutoAWQ's
{"w_bit", "q_group_size", "zero_point", "version"}; SqueezeLLM's {"wbits"}). The user's
`quantization` option names the method explicitly; it must agree with the checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.model.quantization.awq import AWQ_BITS, AWQ_GROUP_SIZES, AWQConfig
from engine.model.quantization.base import QuantizationConfig
from engine.model.quantization.compressed_tensors_detect import compressed_tensors_config
from engine.model.quantization.fp8 import Fp8Config
from engine.model.quantization.gptq import GPTQ_BITS, GPTQ_FORMATS, GPTQ_GROUP_SIZES, GPTQConfig
from engine.model.quantization.squeezellm import SQUEEZELLM_BITS, SqueezeLLMConfig

# The `quantization` option's values (None: what the checkpoint says).
QUANTIZATION_METHODS = ("gptq", "awq", "fp8", "squeezellm", "compressed-tensors")


def read_checkpoint_quantization(model_dir: str | Path) -> tuple[dict[str, Any] | None, str]:
    """(the checkpoint's quantization dict, where it was found) or (None, "") when unquantized."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if config_file.is_file():
        cfg = json.loads(config_file.read_text())
        raw = cfg.get("quantization_config")
        if raw is not None:
            if not isinstance(raw, dict):
                raise ValueError(f"{config_file}: quantization_config must be an object; got {raw!r}")
            return raw, f"{config_file} quantization_config"
    for name in ("quantize_config.json", "quant_config.json"):
        path = model_dir / name
        if path.is_file():
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: expected a JSON object")
            return raw, str(path)
    return None, ""


def _method_of(raw: dict[str, Any], source: str) -> str:
    method = raw.get("quant_method")
    if method is not None:
        return str(method).lower()
    if source.endswith("quantize_config.json"):
        return "gptq"  # AutoGPTQ's file before it wrote quant_method
    if "wbits" in raw:
        return "squeezellm"
    if "w_bit" in raw or "q_group_size" in raw or "version" in raw:
        return "awq"
    raise ValueError(f"{source}: no quant_method, and the fields do not say which format it is")


def resolve_quantization(
    model_dir: str | Path, requested: str | None
) -> tuple[str, str, QuantizationConfig | None]:
    """(method, source, the layers' QuantizationConfig) for the checkpoint in `model_dir`; method
    "none" and config None when it is unquantized. Raises ValueError naming the field and value."""
    raw, source = read_checkpoint_quantization(model_dir)
    if raw is None:
        if requested == "fp8":  # online: quantize the float weights at load, per channel
            return "fp8", "quantization='fp8' (online, per channel)", Fp8Config(from_checkpoint=False)
        if requested is not None:
            raise ValueError(
                f"quantization={requested!r}, but {model_dir} has no quantization config (config.json "
                "quantization_config, quantize_config.json or quant_config.json); weir does not "
                f"quantize to {requested} at load"
            )
        return "none", "", None
    method = _method_of(raw, source)
    if requested is not None and requested != method:
        raise ValueError(
            f"quantization={requested!r}, but the checkpoint is quantized with {method!r} ({source})"
        )
    if method == "gptq":
        return method, source, _gptq(raw, source)
    if method == "awq":
        return method, source, _awq(raw, source)
    if method == "fp8":
        return method, source, _fp8(raw, source)
    if method == "squeezellm":
        return method, source, _squeezellm(raw, source, Path(model_dir))
    if method == "compressed-tensors":
        return method, source, compressed_tensors_config(raw, source)
    raise ValueError(
        f"{source}: quant_method {method!r} is not supported; weir reads {', '.join(QUANTIZATION_METHODS)}"
    )


def _field(
    raw: dict[str, Any], source: str, names: tuple[str, ...], allowed: tuple, default: Any = None
) -> Any:
    """The first of `names` present in `raw` (or `default`), checked against `allowed`."""
    name = next((n for n in names if n in raw), None)
    value = raw[name] if name is not None else default
    if name is None and default is None:
        raise ValueError(f"{source}: missing {names[0]}")
    if isinstance(value, str):
        value = value.lower()
    if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
        shown = ", ".join(map(repr, allowed))
        raise ValueError(
            f"{source}: {name or names[0]}={raw.get(name, value)!r} is not supported (weir supports {shown})"
        )
    return value


def _refuse_if(raw: dict[str, Any], source: str, name: str, bad: Any, why: str) -> None:
    if raw.get(name) == bad:
        raise ValueError(f"{source}: {name}={raw[name]!r} is not supported ({why})")


def _gptq(raw: dict[str, Any], source: str) -> GPTQConfig:
    bits = _field(raw, source, ("bits",), GPTQ_BITS)
    group_size = _field(raw, source, ("group_size",), GPTQ_GROUP_SIZES)
    desc_act = _field(raw, source, ("desc_act",), (True, False), default=False)
    sym = _field(raw, source, ("sym",), (True, False), default=True)
    fmt = _field(raw, source, ("checkpoint_format",), GPTQ_FORMATS, default="gptq")
    _refuse_if(raw, source, "lm_head", True, "a quantized lm_head")
    _refuse_if(raw, source, "is_marlin_format", True, "Marlin-repacked weights")
    if raw.get("dynamic"):
        raise ValueError(f"{source}: dynamic={raw['dynamic']!r} is not supported (per-module overrides)")
    if raw.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise ValueError(
            f"{source}: pack_dtype={raw['pack_dtype']!r} is not supported (weir supports 'int32')"
        )
    skip = tuple(raw.get("modules_to_not_convert") or ())
    return GPTQConfig(bits, group_size, desc_act, sym, fmt, skip)


def _awq(raw: dict[str, Any], source: str) -> AWQConfig:
    _field(raw, source, ("bits", "w_bit"), AWQ_BITS)
    group_size = _field(raw, source, ("group_size", "q_group_size"), AWQ_GROUP_SIZES)
    _field(raw, source, ("zero_point",), (True,), default=True)
    _field(raw, source, ("version",), ("gemm",), default="gemm")
    skip = tuple(raw.get("modules_to_not_convert") or ())
    return AWQConfig(group_size, skip)


def _fp8(raw: dict[str, Any], source: str) -> Fp8Config:
    static = _field(raw, source, ("activation_scheme",), ("dynamic", "static"), default="dynamic") == "static"
    fmt = raw.get("fmt", "e4m3")
    if fmt not in ("e4m3", "float8_e4m3fn"):
        raise ValueError(f"{source}: fmt={fmt!r} is not supported (weir supports 'e4m3')")
    block = raw.get("weight_block_size")
    if block is not None:
        ok = isinstance(block, list) and len(block) == 2
        if not ok or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
            raise ValueError(
                f"{source}: weight_block_size={block!r} is not supported (two positive integers)"
            )
        block = (block[0], block[1])
    skip = tuple(raw.get("ignored_layers") or raw.get("modules_to_not_convert") or ())
    return Fp8Config(
        from_checkpoint=True, weight_block_size=block, skip_modules=skip, static_activations=static
    )


# SqueezeLLM's dense-and-sparse checkpoints keep outliers in CSR tensors next to qweight.
_SQUEEZELLM_SPARSE = (".rows", ".cols", ".vals")


def _squeezellm(raw: dict[str, Any], source: str, model_dir: Path) -> SqueezeLLMConfig:
    bits = _field(raw, source, ("wbits",), SQUEEZELLM_BITS)
    from safetensors import safe_open  # noqa: PLC0415

    from engine.model.weight_loader import find_safetensors_files  # noqa: PLC0415 (imports layers)

    try:
        files = find_safetensors_files(model_dir)
    except ValueError:  # no weights (yet): the loader reports that
        files = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            sparse = next((n for n in f.keys() if n.endswith(_SQUEEZELLM_SPARSE)), None)  # noqa: SIM118
        if sparse is not None:
            raise ValueError(
                f"{file.name}: {sparse} is a dense-and-sparse SqueezeLLM tensor; weir reads the dense "
                "format only (SqueezeLLM's s0 checkpoints)"
            )
    return SqueezeLLMConfig(bits=bits)
