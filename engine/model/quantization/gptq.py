"""GPTQ weights (`quant_method: "gptq"`), as AutoGPTQ and GPTQModel write them.

Per linear layer (in = input features, out = output features, pf = 32 // bits, G = in // group_size,
or 1 for group_size -1):
- `qweight` int32 [in / pf, out]: codes packed along the input dim, first row in the lowest bits
  (engine.model.quantization.packing.unpack_rows);
- `qzeros` int32 [G, out / pf]: zero points packed along the output dim; checkpoint_format "gptq"
  stores zero - 1 (AutoGPTQ's historical offset, added back here as vLLM's kernels do, without
  wrapping), "gptq_v2" the zero itself;
- `scales` fp16 [G, out]; `g_idx` int32 [in]: the group of each input row (act order when desc_act).
w[i, o] = (code[i, o] - zero[g_idx[i], o]) * scale[g_idx[i], o]; y = x w.
Reference: GPTQModel, gptqmodel/nn_modules/qlinear/__init__.py, BaseQuantLinear.dequantize_weight.

The post-load hook unpacks the codes to uint8 [out, in] and the zeros and scales to float32
[out, G], so `apply` dequantizes with one fused elementwise expression and calls F.linear. Act order
(desc_act) is turned into a load-time permutation of the input columns (engine: `perm`), leaving
contiguous groups, the layout the fused kernel (ops/triton/wna16_gemm.py) reads: on CUDA the layer
ends packed for it (engine.model.quantization.wna16), on CPU in the reference's layout above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.model.parameter import WeightLoader, register_weight
from engine.model.quantization.act_order import g_idx_loader, group_order
from engine.model.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig
from engine.model.quantization.common import (
    apply_weight_only,
    experts_skipped,
    is_skipped,
    register_weight_only,
    silu_mul_weight_only,
    unpacking_loader,
)
from engine.model.quantization.packing import pack_factor, unpack_cols, unpack_rows
from engine.model.quantization.unquantized import UnquantizedFusedMoEMethod, UnquantizedLinearMethod

if TYPE_CHECKING:
    from engine.model.layers.linear import LinearBase

GPTQ_BITS = (4, 8)
GPTQ_GROUP_SIZES = (-1, 32, 64, 128)
GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True, slots=True)
class GPTQConfig(QuantizationConfig):
    bits: int
    group_size: int  # -1: one group over the whole input
    desc_act: bool
    sym: bool
    checkpoint_format: str  # "gptq": zeros stored minus one; "gptq_v2": as they are
    skip_modules: tuple[str, ...] = ()  # modules the checkpoint left unquantized
    name: str = "gptq"

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        if is_skipped(prefix, self.skip_modules):
            return UnquantizedLinearMethod()
        return GPTQLinearMethod(self)

    def moe_refusal(self) -> str | None:
        return None  # every option, act order too (wna16_moe.fold_act_order; one rank only, refused at build)

    def get_moe_method(self, layer: nn.Module, prefix: str) -> FusedMoEMethodBase:
        from engine.model.quantization.wna16_moe import WNA16FusedMoEMethod, gptq_format  # noqa: PLC0415

        if experts_skipped(
            layer.checkpoint_module_names(), prefix, lambda n: is_skipped(n, self.skip_modules)
        ):
            return UnquantizedFusedMoEMethod()
        return WNA16FusedMoEMethod(
            gptq_format(self.bits, self.group_size, self.checkpoint_format, self.desc_act)
        )


class GPTQLinearMethod(LinearMethodBase):
    def __init__(self, config: GPTQConfig) -> None:
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
        # -1: one group over the whole input, whose scales every rank of a row-parallel layer shares
        group_size = cfg.group_size if cfg.group_size != -1 else input_size_per_partition
        out = sum(output_partition_sizes)
        if input_size_per_partition % group_size or input_size_per_partition % pf:
            raise ValueError(
                f"GPTQ layer {prefix}: input size {input_size_per_partition} is not a multiple of "
                f"group_size {cfg.group_size} and of {pf} (codes per int32)"
            )
        if any(size % pf for size in output_partition_sizes):
            raise ValueError(
                f"GPTQ layer {prefix}: output sizes {output_partition_sizes} are not multiples of {pf}"
            )
        groups = input_size_per_partition // group_size
        grouped = {"input_dim": 0, "packed_dim": 0, "pack_factor": group_size} if cfg.group_size != -1 else {}

        # [in / pf, out] int32, codes packed along the input
        register_weight(
            layer,
            "qweight",
            torch.empty(input_size_per_partition // pf, out, dtype=torch.int32),
            {
                "input_dim": 0,
                "output_dim": 1,
                "packed_dim": 0,
                "pack_factor": pf,
                "weight_loader": weight_loader,
            },
        )
        # [G, out] int32: unpacked from the checkpoint's [G, out / pf] as it loads
        register_weight(
            layer,
            "qzeros",
            torch.empty(groups, out, dtype=torch.int32),
            {
                **grouped,
                "output_dim": 1,
                "weight_loader": unpacking_loader(weight_loader, self._unpack_zeros, f"{prefix}.qzeros"),
            },
        )
        # [G, out] fp16, as stored (converting to a bf16 model dtype would round them)
        register_weight(
            layer,
            "scales",
            torch.empty(groups, out, dtype=torch.float16),
            {**grouped, "output_dim": 1, "weight_loader": weight_loader},
        )
        # [in] int32, whole on every fused shard (q/k/v share an act order); a row-parallel rank's
        # rows, renumbered to the groups it holds
        loader = g_idx_loader(
            layer,
            input_size_per_partition != input_size,
            groups if cfg.group_size != -1 else 0,
            f"GPTQ layer {prefix}",
            "act order (desc_act)",
            "re-quantize without desc_act",
        )
        register_weight(
            layer,
            "g_idx",
            torch.empty(input_size_per_partition, dtype=torch.int32),
            {
                "weight_loader": loader,
                # random weights (load_format dummy): contiguous groups, as without act order
                "dummy_init": lambda: torch.arange(input_size_per_partition, dtype=torch.int32) // group_size,
            },
        )

    def _unpack_zeros(self, packed: torch.Tensor) -> torch.Tensor:
        return unpack_cols(packed, self.config.bits)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        cfg = self.config
        prefix = getattr(layer, "prefix", "")
        codes = unpack_rows(layer.qweight.data, cfg.bits).t()  # [out, in] uint8
        mask = (1 << cfg.bits) - 1
        zeros = (layer.qzeros.data & mask).float() + (1.0 if cfg.checkpoint_format == "gptq" else 0.0)
        scales = layer.scales.data.float()  # [G, out]
        codes, perm, g_idx = group_order(codes, layer.g_idx.data, scales.shape[0], f"GPTQ layer {prefix}")
        del layer.qweight, layer.qzeros, layer.scales, layer.g_idx
        register_weight_only(
            layer,
            codes.contiguous(),  # [out, in] uint8, in perm order
            zeros.t().contiguous(),  # [out, G] float32
            scales.t().contiguous(),  # [out, G] float32
            perm,  # None: the input order is the checkpoint's
            # None: groups are contiguous, and dequantize reshapes instead of gathering (else: uneven
            # act-order groups, gathered per call)
            g_idx,
            cfg.bits,
        )

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_weight_only(layer, x, bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return silu_mul_weight_only(layer, x)
