"""compressed-tensors checkpoints (`quant_method: "compressed-tensors"`, what llm-compressor writes),
mapped onto weir's methods:
- `pack-quantized` integer weights (W4A16, W8A16), per group or per channel:
  `weight_packed` int32 [out, in / pf] (codes + 2**(bits - 1), pf = 32 // bits per word along the
  input, the first column in the lowest bits), `weight_scale` [out, in / group_size] ([out, 1] per
  channel), `weight_shape` [2]. Symmetric: w = (code - 2**(bits - 1)) * scale, i.e. GPTQ's
  reference with a fixed zero point. Asymmetric (`symmetric: false`): also `weight_zero_point` int32
  [out / pf, G], the signed zero points + 2**(bits - 1) packed the same way but along the OUTPUT dim
  (pack_to_int32(zp, bits, packed_dim=0)); w = (code - zp) * scale, both offsets cancelling. Either
  way GPTQ's reference and the same Triton kernels on CUDA (engine.model.quantization.wna16), which
  take the zero points as values. `actorder: "weight"` (alias "static") only reordered the
  calibration: the same layout as without it. `actorder: "group"` (alias "dynamic"; removed from
  compressed-tensors in 0.20, still in the checkpoints older llm-compressor wrote): also
  `weight_g_idx` int32 [in], the group of each input column (scale[:, g_idx[i]] for column i), read
  as GPTQ's act order (engine.model.quantization.act_order): a load-time permutation of the input.
- `float-quantized` FP8 weights (per tensor, per channel, or per block with `weight_scale` as the
  block scales): the fp8 method (engine.model.quantization.fp8), dynamic per-token activations.
- `kv_cache_scheme` (8-bit float, per tensor or `attn_head`): the k/v scales engine.model.quantization.kv_cache reads
  when the KV cache is fp8.
Reference: compressed-tensors (github.com/neuralmagic/compressed-tensors),
src/compressed_tensors/compressors/quantized_compressors/pack_quantized.py (pack_to_int32, the
"weight_packed"/"weight_shape"/"weight_zero_point" names; from 0.20 compressors/pack_quantized/
base.py PackedQuantizationCompressor and helpers.py), quantization/quant_args.py (the scheme fields); vLLM,
compressed_tensors.py, CompressedTensorsConfig (how a serving engine maps them).

One scheme per checkpoint (one entry of config_groups, targeting Linear); `ignore` names modules kept
in the model dtype, literally or as `re:` patterns. Anything else is refused by detect.py naming the
field: static activation scales other than per tensor, sparsity, other bit widths or strategies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.model.parameter import WeightLoader, register_weight
from engine.model.quantization.act_order import g_idx_loader, group_order
from engine.model.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig
from engine.model.quantization.common import (
    apply_weight_only,
    experts_skipped,
    is_ignored,
    register_weight_only,
    silu_mul_weight_only,
    unpacking_loader,
)
from engine.model.quantization.packing import pack_factor, unpack_cols, unpack_rows
from engine.model.quantization.unquantized import UnquantizedFusedMoEMethod, UnquantizedLinearMethod

if TYPE_CHECKING:
    from engine.model.layers.linear import LinearBase

CT_INT_BITS = (4, 8)
CT_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True, slots=True)
class CompressedTensorsWNA16Config(QuantizationConfig):
    """pack-quantized integer weights; group_size -1: one scale per output channel; symmetric False:
    a zero point per scale (weight_zero_point); act_order (actorder "group"): weight_g_idx."""

    bits: int
    group_size: int
    ignore: tuple[str, ...] = ()
    symmetric: bool = True
    act_order: bool = False
    name: str = "compressed-tensors"

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        if is_ignored(prefix, self.ignore):
            return UnquantizedLinearMethod()
        return CompressedTensorsWNA16Method(self)

    def moe_refusal(self) -> str | None:
        return None  # actorder "group" too (wna16_moe.fold_act_order; one rank only, refused at build)

    def get_moe_method(self, layer: nn.Module, prefix: str) -> FusedMoEMethodBase:
        from engine.model.quantization.wna16_moe import (  # noqa: PLC0415
            WNA16FusedMoEMethod,
            compressed_tensors_format,
        )

        if experts_skipped(layer.checkpoint_module_names(), prefix, lambda n: is_ignored(n, self.ignore)):
            return UnquantizedFusedMoEMethod()
        return WNA16FusedMoEMethod(
            compressed_tensors_format(self.bits, self.group_size, self.symmetric, self.act_order)
        )


@dataclass(frozen=True, slots=True)
class CompressedTensorsUnquantizedConfig(QuantizationConfig):
    """A checkpoint whose only scheme is the KV cache's (kv_cache_scheme, no config_groups)."""

    name: str = "compressed-tensors"

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        del layer, prefix
        return UnquantizedLinearMethod()

    def moe_refusal(self) -> str | None:
        return None  # float experts

    def get_moe_method(self, layer: nn.Module, prefix: str) -> FusedMoEMethodBase:
        del layer, prefix
        return UnquantizedFusedMoEMethod()


class CompressedTensorsWNA16Method(LinearMethodBase):
    def __init__(self, config: CompressedTensorsWNA16Config) -> None:
        self.config = config

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        del output_size, params_dtype
        cfg = self.config
        prefix = getattr(layer, "prefix", "")
        pf = pack_factor(cfg.bits)
        group_size = cfg.group_size if cfg.group_size != -1 else input_size_per_partition
        if input_size_per_partition % group_size or input_size_per_partition % pf:
            raise ValueError(
                f"compressed-tensors layer {prefix}: input size {input_size_per_partition} is not a multiple "
                f"of group_size {cfg.group_size} and of {pf} (codes per int32)"
            )
        out = sum(output_partition_sizes)
        if not cfg.symmetric and any(size % pf for size in output_partition_sizes):
            raise ValueError(
                f"compressed-tensors layer {prefix}: output sizes {output_partition_sizes} are not multiples "
                f"of {pf} (zero points per int32, packed along the output)"
            )

        # [out, in / pf] int32: codes packed along the input (the last dim)
        register_weight(
            layer,
            "weight_packed",
            torch.empty(out, input_size_per_partition // pf, dtype=torch.int32),
            {
                "output_dim": 0,
                "input_dim": 1,
                "packed_dim": 1,
                "pack_factor": pf,
                "weight_loader": _int32_only(weight_loader, f"{prefix}.weight_packed"),
            },
        )
        # [out, G] scales in the checkpoint's float dtype, held as float32 (exact)
        grouped = {"input_dim": 1, "packed_dim": 1, "pack_factor": group_size} if cfg.group_size != -1 else {}
        register_weight(
            layer,
            "weight_scale",
            torch.empty(out, input_size_per_partition // group_size, dtype=torch.float32),
            {**grouped, "output_dim": 0, "weight_loader": weight_loader},
        )
        if not cfg.symmetric:
            # [out, G] int32: unpacked from the checkpoint's [out / pf, G] as it loads (packed along the
            # output, grouped along the input: two packings one packed_dim cannot describe), then split
            # across ranks like the scales
            register_weight(
                layer,
                "weight_zero_point",
                torch.empty(out, input_size_per_partition // group_size, dtype=torch.int32),
                {
                    **grouped,
                    "output_dim": 0,
                    "weight_loader": unpacking_loader(
                        weight_loader, self._unpack_zeros, f"{prefix}.weight_zero_point"
                    ),
                },
            )
        if cfg.act_order:
            # [in] int32, whole on every fused shard (q/k/v share an act order); a row-parallel rank's
            # rows, renumbered to the groups it holds
            loader = g_idx_loader(
                layer,
                input_size_per_partition != input_size,
                input_size_per_partition // group_size,
                f"compressed-tensors layer {prefix}",
                "act order (actorder 'group')",
                "re-quantize with actorder 'weight'",
            )
            register_weight(
                layer,
                "weight_g_idx",
                torch.empty(input_size_per_partition, dtype=torch.int32),
                {
                    "weight_loader": loader,
                    # random weights (load_format dummy): contiguous groups
                    "dummy_init": lambda: (
                        torch.arange(input_size_per_partition, dtype=torch.int32) // group_size
                    ),
                },
            )
        # [2] int: each checkpoint module's logical (out, in); checked, then dropped
        register_weight(
            layer,
            "weight_shape",
            torch.zeros(2, dtype=torch.int64),
            {"weight_loader": _weight_shape_loader(input_size, f"{prefix}.weight_shape")},
        )

    def _unpack_zeros(self, packed: torch.Tensor) -> torch.Tensor:
        return unpack_rows(packed, self.config.bits)  # [out / pf, G] int32 -> [out, G] uint8

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        bits = self.config.bits
        codes = unpack_cols(layer.weight_packed.data, bits)  # [out, in] uint8
        scales = layer.weight_scale.data.float()  # [out, G]
        if self.config.symmetric:
            zeros = torch.full_like(scales, float(1 << (bits - 1)))  # the offset packing added
        else:
            # zp + 2**(bits - 1), as packed; the mask keeps random (dummy) weights in range
            zeros = (layer.weight_zero_point.data & ((1 << bits) - 1)).float()  # [out, G]
            del layer.weight_zero_point
        perm = g_idx = None
        if self.config.act_order:
            name = f"compressed-tensors layer {getattr(layer, 'prefix', '')}"
            codes, perm, g_idx = group_order(codes, layer.weight_g_idx.data, scales.shape[1], name)
            del layer.weight_g_idx
        del layer.weight_packed, layer.weight_scale, layer.weight_shape
        register_weight_only(layer, codes, zeros, scales, perm, g_idx, bits)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_weight_only(layer, x, bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return silu_mul_weight_only(layer, x)


def _int32_only(weight_loader: WeightLoader, name: str) -> WeightLoader:
    def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if loaded_weight.dtype != torch.int32:
            raise ValueError(f"{name}: pack-quantized weights must be int32; got {loaded_weight.dtype}")
        weight_loader(param, loaded_weight, shard_id)

    return load


def _weight_shape_loader(input_size: int, name: str) -> WeightLoader:
    """weight_shape must say the module's input is the layer's whole input (a mismatched file)."""

    def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        del param, shard_id
        shape = tuple(int(v) for v in loaded_weight.reshape(-1).tolist())
        if len(shape) != 2 or shape[1] != input_size:
            raise ValueError(f"{name} is {list(shape)}; the model's layer takes {input_size} inputs")

    return load
