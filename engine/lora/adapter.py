"""Loading a PEFT LoRA adapter from disk, checked against the base model, into host tensors.

The format: a directory with adapter_config.json (`r`, `lora_alpha`, `target_modules` as a list of
module names or one regex, `use_rslora`, ...) and adapter_model.safetensors whose keys are PEFT's
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`: A is [r, in_features], B is
[out_features, r]). Pickled weights (.bin/.pt) are refused, never loaded.

Mixture-of-experts models: LoRA applies to their attention projections (and to dense or shared-expert
MLPs, which are ordinary linear layers); an adapter that targets the experts, the router or the
shared-expert gate (PEFT's `target_parameters`, or such modules' keys) is refused naming them.

Everything wrong with an adapter is found here, at load, and raised as a LoRAAdapterError naming
the adapter and the field: nothing later (slots, kernels, steps) can fail on a bad adapter.

The result maps each of weir's linear layers (by prefix: `model.layers.0.self_attn.qkv_proj`) to
its sub-matrices' A and B (fused layers: q/k/v, gate/up) in the model dtype, unsharded, with the
scaling (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) to fold into B. It is folded when B is
written into a slot (one pass: scale and copy; engine.lora.layers), not here: B as read from the file
is kept as it is (no fp32 round trip of every B on the first request's path). The result is the
same: x * s on a 16-bit tensor computes in fp32 and rounds once, as (x.float() * s).to(dtype) did.
When the file's dtype is not the model's, the conversion must round once, after the scaling: B is
then scaled here, in fp32, and `scale` is 1.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import LoRAAdapterError
from engine.lora.request import LoRARequest

__all__ = ["LoRAAdapter", "LoRAAdapterError", "LoRALayerWeights", "LoRATarget", "load_adapter"]

_PEFT_PREFIX = "base_model.model."
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True, slots=True)
class LoRATarget:
    """Where one Hugging Face projection (`model.layers.0.self_attn.k_proj`) lives in weir."""

    layer_prefix: str  # weir's layer: `model.layers.0.self_attn.qkv_proj`
    slice_index: int  # its sub-matrix (q 0, k 1, v 2; gate 0, up 1; 0 for unfused layers)
    in_features: int  # the whole (unsharded) projection's shape
    out_features: int
    # A projection the checkpoint already fuses (Phi-3's qkv_proj, gate_up_proj): every sub-matrix's
    # output rows, in order. Its one A serves each of them and B's rows split by these sizes, which
    # is the same product (B A x, its rows taken per sub-matrix). Empty: one sub-matrix, slice_index.
    slice_sizes: tuple[int, ...] = ()
    # B's rows in the order weir's layer holds its output rows, where the layer reorders the checkpoint's at
    # load (GLM's and Cohere's q/k rows: engine.model.models.glm); None: as the checkpoint has them.
    b_row_order: torch.Tensor | None = None
    # The checkpoint stores this projection as a Conv1D ([in, out]: GPT-2's). PEFT then saves the adapter with
    # `fan_in_fan_out`, which changes only how it merges: its A and B are [r, in] and [out, r] all the same.
    conv1d: bool = False


@dataclass(eq=False, slots=True)
class LoRALayerWeights:
    """One weir layer's adapter weights, per sub-matrix (None: that sub-matrix is not adapted)."""

    a: list[torch.Tensor | None]  # [rank, in_features] each
    b: list[torch.Tensor | None]  # [out_features, rank] each, before the scaling
    scale: list[float]  # per sub-matrix: the LoRA scaling still to multiply B by (1.0: folded in)


@dataclass(eq=False, slots=True)
class LoRAAdapter:
    """A loaded adapter on the host. Compared by identity: a reload is a new adapter (new slot)."""

    lora_request: LoRARequest
    rank: int
    layers: dict[str, LoRALayerWeights] = field(default_factory=dict)

    @property
    def lora_int_id(self) -> int:
        return self.lora_request.lora_int_id

    @property
    def nbytes(self) -> int:
        # A fused projection's one A serves each of its sub-matrices: counted once.
        tensors = {id(t): t for w in self.layers.values() for t in (*w.a, *w.b) if t is not None}
        return sum(t.numel() * t.element_size() for t in tensors.values())


def load_adapter(
    lora_request: LoRARequest,
    targets: dict[str, LoRATarget],  # Hugging Face module name -> where it lives (engine.lora.layers)
    num_slices: dict[str, int],  # weir layer prefix -> its number of sub-matrices
    max_lora_rank: int,
    dtype: torch.dtype,
) -> LoRAAdapter:
    """Read, check and convert one adapter. Raises LoRAAdapterError (a ValueError)."""
    name = lora_request.lora_name

    def error(field_name: str, detail: str) -> LoRAAdapterError:
        return LoRAAdapterError(name, field_name, detail)

    path = Path(lora_request.lora_path)
    if not path.is_dir():
        raise error("lora_path", f"{str(path)!r} is not a directory")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise error("adapter_config.json", f"missing in {str(path)!r} (not a PEFT adapter directory?)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise error("adapter_config.json", f"unreadable: {e}") from None
    if not isinstance(config, dict):
        raise error("adapter_config.json", "must hold a JSON object")
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise error(
                pickled[0],
                "pickled weights are never loaded (unpickling runs code); convert them to "
                "adapter_model.safetensors, e.g. PeftModel.from_pretrained(base, dir)"
                ".save_pretrained(out_dir, safe_serialization=True)",
            )
        raise error("adapter_model.safetensors", f"missing in {str(path)!r}")

    rank, alpha = _check_config(config, targets, max_lora_rank, error)
    scaling_of = (lambda r: alpha / math.sqrt(r)) if config.get("use_rslora") else (lambda r: alpha / r)
    has_rank_pattern = bool(config.get("rank_pattern"))

    from safetensors import safe_open  # noqa: PLC0415  (only adapters need it here)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                module, kind = _split_key(key, error)
                if module not in targets and _is_moe_module(module):
                    raise error(
                        key,
                        f"module {module!r} is a mixture-of-experts module (experts, router or shared-expert "
                        "gate): LoRA on MoE experts is not supported",
                    )
                if module not in targets:
                    raise error(
                        key,
                        f"module {module!r} is not a projection weir applies LoRA to ({_supported(targets)})",
                    )
                pairs.setdefault(module, {})[kind] = f.get_tensor(key)
    except LoRAAdapterError:
        raise
    except Exception as e:  # noqa: BLE001  SafetensorError (a truncated or corrupt file) is no ValueError:
        # it escaped the server's load route as a 500 and `--lora-modules` as a traceback.
        raise error("adapter_model.safetensors", f"unreadable: {e}") from None

    adapter = LoRAAdapter(lora_request=lora_request, rank=rank)
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise error(
                f"{_PEFT_PREFIX}{module}.{missing}.weight", "missing (lora_A and lora_B come in pairs)"
            )
        target = targets[module]
        a, b = pair["A"], pair["B"]
        for kind, tensor in (("lora_A", a), ("lora_B", b)):
            # Integer weights would be converted as numbers, NaN or infinite ones would turn every
            # output of the adapter into token 0: both were served without a word.
            key = f"{_PEFT_PREFIX}{module}.{kind}.weight"
            if not tensor.dtype.is_floating_point:
                raise error(
                    key, f"dtype {str(tensor.dtype).removeprefix('torch.')} is not a floating-point dtype"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise error(key, "holds NaN or infinite values")
        r = a.shape[0] if a.dim() == 2 else -1
        if not has_rank_pattern and r != rank:
            r = rank  # report the shape mismatch against the configured rank below
        want_a, want_b = (r, target.in_features), (target.out_features, r)
        for kind, tensor, want in (("lora_A", a, want_a), ("lora_B", b, want_b)):
            if tuple(tensor.shape) != want:
                raise error(
                    f"{_PEFT_PREFIX}{module}.{kind}.weight",
                    f"shape {tuple(tensor.shape)} does not match the base model's {want}",
                )
        if r > max_lora_rank:
            raise error("rank_pattern", f"rank {r} of {module} is above max_lora_rank {max_lora_rank}")
        layer = adapter.layers.get(target.layer_prefix)
        if layer is None:
            n = num_slices[target.layer_prefix]
            layer = adapter.layers[target.layer_prefix] = LoRALayerWeights(
                a=[None] * n, b=[None] * n, scale=[1.0] * n
            )
        if target.b_row_order is not None:
            b = b[target.b_row_order]  # [out, r]: the rows as the layer's were reordered at load
        a = a.to(dtype).contiguous()
        scale = scaling_of(r)
        if b.dtype != dtype:  # scaled here, rounded once (see the module docstring)
            b, scale = (b.float() * scale).to(dtype), 1.0
        sizes = target.slice_sizes or (target.out_features,)
        first = 0 if target.slice_sizes else target.slice_index
        for i, b_rows in enumerate(b.split(list(sizes))):  # a fused projection's B, per sub-matrix
            layer.a[first + i] = a
            layer.b[first + i] = b_rows.contiguous()
            layer.scale[first + i] = scale
    if not adapter.layers:
        raise error("adapter_model.safetensors", "holds no LoRA weights")
    return adapter


def _check_config(
    config: dict, targets: dict[str, LoRATarget], max_lora_rank: int, error
) -> tuple[int, float]:  # noqa: ANN001
    """The config's rank and alpha, once every setting weir cannot serve has been refused."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise error("peft_type", f"{peft_type!r} adapters are not supported (only LORA)")
    # What PEFT makes of MLP targets on transformers 5's stacked experts (with an alpha/rank pattern for
    # them): named first, as the reason.
    if config.get("target_parameters"):
        params = config["target_parameters"]
        # A target module "gate" is the router in transformers 5's MoE blocks, not an expert.
        if any(str(p).split(".")[0] == "gate" for p in params):
            raise error(
                "target_parameters", f"{params} targets the MoE router: LoRA on the router is not supported"
            )
        raise error(
            "target_parameters",
            f"{params} targets MoE expert parameters: LoRA on MoE experts is not supported",
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise error("r", f"must be a positive integer; got {rank!r}")
    if rank > max_lora_rank:
        raise error("r", f"rank {rank} is above max_lora_rank {max_lora_rank} (raise --max-lora-rank)")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        # JSON's NaN / Infinity parse as floats: the scaling would make every output token 0.
        raise error("lora_alpha", f"must be a finite number; got {alpha!r}")
    if config.get("use_dora"):
        raise error("use_dora", "DoRA adapters are not supported")
    if config.get("modules_to_save"):
        raise error(
            "modules_to_save",
            f"{config['modules_to_save']} would replace whole base-model modules per adapter; not supported",
        )
    if config.get("bias", "none") != "none":
        raise error("bias", f"{config['bias']!r}: adapters that train biases are not supported")
    if config.get("fan_in_fan_out") and not all(t.conv1d for t in targets.values()):
        # (on a model whose checkpoint stores Linear weights, a transposed adapter was made for another one)
        raise error("fan_in_fan_out", "transposed (Conv1D) weights are not supported for this model")
    if config.get("alpha_pattern"):
        raise error("alpha_pattern", "per-module lora_alpha is not supported")
    modules = config.get("target_modules")
    leaves = {m.rsplit(".", 1)[-1] for m in targets}
    if isinstance(modules, str):
        # A regex PEFT matches against full module names: check what it would select.
        try:
            pattern = re.compile(modules)
        except re.error as e:
            raise error("target_modules", f"invalid regex {modules!r}: {e}") from None
        unsupported = sorted(n for n in ("model.embed_tokens", "lm_head") if pattern.fullmatch(n))
        if unsupported:
            raise error("target_modules", f"{unsupported[0]} is not supported ({_supported(targets)})")
    elif isinstance(modules, list):
        for module in modules:
            if not isinstance(module, str) or module.rsplit(".", 1)[-1] not in leaves:
                raise error("target_modules", f"{module!r} is not supported ({_supported(targets)})")
    elif modules is not None:
        raise error("target_modules", f"must be a list of module names or a regex; got {modules!r}")
    return rank, float(alpha)


def _is_moe_module(module: str) -> bool:
    """A module of a mixture-of-experts block weir runs without LoRA: the stacked or per-expert experts
    (`mlp.experts`, `mlp.experts.3.gate_proj`, Mixtral's `block_sparse_moe.experts.0.w1`), the router
    (`mlp.gate`, `block_sparse_moe.gate`) or Qwen2-MoE's `shared_expert_gate`."""
    parts = module.split(".")
    return (
        "experts" in parts
        or "block_sparse_moe" in parts
        or parts[-1] == "shared_expert_gate"
        or parts[-2:] == ["mlp", "gate"]
    )


def _split_key(key: str, error) -> tuple[str, str]:  # noqa: ANN001
    """`base_model.model.<module>.lora_A.weight` -> (<module>, "A")."""
    body = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
    for kind in ("A", "B"):
        for suffix in (f".lora_{kind}.weight", f".lora_{kind}.default.weight"):
            if body.endswith(suffix):
                return body[: -len(suffix)], kind
    if "lora_magnitude_vector" in body:
        raise error(key, "DoRA magnitudes are not supported")
    if "lora_embedding" in body:
        raise error(key, "LoRA on embeddings is not supported")
    raise error(key, "not a LoRA weight (lora_A / lora_B) weir can apply")


def _supported(targets: dict[str, LoRATarget]) -> str:
    leaves = sorted({m.rsplit(".", 1)[-1] for m in targets})
    return "supported: " + ", ".join(leaves)
