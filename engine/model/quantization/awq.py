"""AWQ weights (`quant_method: "awq"`, GEMM version), as AutoAWQ writes them.

Per linear layer (in, out, G = in // group_size), 4-bit codes, eight per int32:
- `qweight` int32 [in, out / 8] and `qzeros` int32 [G, out / 8]: packed along the output dim in
  AWQ's interleaved order (value k of a word holds column [0, 2, 4, 6, 1, 3, 5, 7][k] of its 8);
- `scales` fp16 [G, out].
w[i, o] = (code[i, o] - zero[i // group_size, o]) * scale[i // group_size, o]; y = x w.
Reference: AutoAWQ, awq/modules/linear/gemm.py, WQLinear_GEMM.from_linear (packing) and
awq/utils/packing_utils.py, dequantize_gemm (unpacking with the reverse order [0, 4, 1, 5, 2, 6, 3, 7]).

The post-load hook unpacks codes to uint8 [out, in] and zeros/scales to float32 [out, G] (on CUDA:
repacked for the Triton kernels, engine.model.quantization.wna16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.model.parameter import WeightLoader, register_weight
from engine.model.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig
from engine.model.quantization.common import (
    apply_weight_only,
    experts_skipped,
    is_skipped,
    register_weight_only,
    silu_mul_weight_only,
    unpacking_loader,
)
from engine.model.quantization.packing import AWQ_PACK_ORDER, unpack_cols
from engine.model.quantization.unquantized import UnquantizedFusedMoEMethod, UnquantizedLinearMethod

if TYPE_CHECKING:
    from engine.model.layers.linear import LinearBase

AWQ_BITS = (4,)
AWQ_GROUP_SIZES = (64, 128)
_PF = 8


@dataclass(frozen=True, slots=True)
class AWQConfig(QuantizationConfig):
    group_size: int
    skip_modules: tuple[str, ...] = ()  # modules_to_not_convert
    bits: int = 4
    name: str = "awq"

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        if is_skipped(prefix, self.skip_modules):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(self)

    def moe_refusal(self) -> str | None:
        return None

    def get_moe_method(self, layer: nn.Module, prefix: str) -> FusedMoEMethodBase:
        from engine.model.quantization.wna16_moe import WNA16FusedMoEMethod, awq_format  # noqa: PLC0415

        if experts_skipped(
            layer.checkpoint_module_names(), prefix, lambda n: is_skipped(n, self.skip_modules)
        ):
            return UnquantizedFusedMoEMethod()
        return WNA16FusedMoEMethod(awq_format(self.group_size))


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    return unpack_cols(packed, 4, AWQ_PACK_ORDER)


class AWQLinearMethod(LinearMethodBase):
    def __init__(self, config: AWQConfig) -> None:
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
        del input_size, output_size, params_dtype
        group_size = self.config.group_size
        prefix = getattr(layer, "prefix", "")
        if input_size_per_partition % group_size:
            raise ValueError(
                f"AWQ layer {prefix}: input size {input_size_per_partition} is not a multiple of "
                f"group_size {group_size}"
            )
        if any(size % _PF for size in output_partition_sizes):
            raise ValueError(
                f"AWQ layer {prefix}: output sizes {output_partition_sizes} are not multiples of 8"
            )
        out = sum(output_partition_sizes)
        groups = input_size_per_partition // group_size
        grouped = {"input_dim": 0, "packed_dim": 0, "pack_factor": group_size, "output_dim": 1}

        # [in, out / 8] int32, codes packed along the output
        register_weight(
            layer,
            "qweight",
            torch.empty(input_size_per_partition, out // _PF, dtype=torch.int32),
            {
                "input_dim": 0,
                "output_dim": 1,
                "packed_dim": 1,
                "pack_factor": _PF,
                "weight_loader": weight_loader,
            },
        )
        # [G, out] int32: unpacked from the checkpoint's [G, out / 8] as it loads
        register_weight(
            layer,
            "qzeros",
            torch.empty(groups, out, dtype=torch.int32),
            {**grouped, "weight_loader": unpacking_loader(weight_loader, _unpack_awq, f"{prefix}.qzeros")},
        )
        register_weight(
            layer,
            "scales",
            torch.empty(groups, out, dtype=torch.float16),
            {**grouped, "weight_loader": weight_loader},
        )

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes = _unpack_awq(layer.qweight.data)  # [in, out] uint8
        zeros = (layer.qzeros.data & 0xF).float()  # [G, out]
        scales = layer.scales.data.float()  # [G, out]
        del layer.qweight, layer.qzeros, layer.scales
        # contiguous groups in the checkpoint's input order: GPTQ's layout (on CUDA: repacked along
        # the input for the Triton kernels, engine.model.quantization.wna16)
        register_weight_only(
            layer, codes.t().contiguous(), zeros.t().contiguous(), scales.t().contiguous(), None, None, 4
        )

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_weight_only(layer, x, bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return silu_mul_weight_only(layer, x)
