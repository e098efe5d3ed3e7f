"""SqueezeLLM weights (quant_config.json `{"wbits": 4}`), the dense format SqueezeLLM's tools write and
vLLM read until it dropped the method in 2024.

Per linear layer (in, out), 4-bit codes, eight per int32:
- `qweight` int32 [in / 8, out]: codes packed along the input dim, the first row in the lowest bits
  (GPTQ's packing: engine.model.quantization.packing.unpack_rows);
- `lookup_table` fp16 [out, 16]: each output channel's own 16 (non-uniform) weight values.
w[i, o] = lookup_table[o, code[i, o]]; y = x w. No zero points, no groups.
Reference: SqueezeLLM (github.com/SqueezeAILab/SqueezeLLM), squeezellm/quant.py, QuantLinear.pack
(packing) and the kernel VecQuant4MatMulKernelNUQPerChannel (lookup per output channel); vLLM v0.5,
vllm/model_executor/layers/quantization/squeezellm.py, SqueezeLLMLinearMethod (parameter layout).

Only the dense variant (SqueezeLLM's "s0" checkpoints) exists here: its dense-and-sparse ones add
outlier tensors (`rows`, `cols`, `vals`), which detect.py refuses by name. On CPU the post-load hook
unpacks the codes to uint8 [out, in] and the table to float32, and `apply` looks every weight up
(exact: fp16 values) and calls F.linear; on CUDA the packed codes stay as stored and the Triton
W4A16 kernels look the weights up in their inner loop (engine.model.quantization.wna16.apply_lut).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.parameter import WeightLoader, register_weight
from engine.model.quantization.base import LinearMethodBase, QuantizationConfig
from engine.model.quantization.packing import unpack_rows
from engine.model.quantization.wna16 import apply_lut, triton_wna16_available, use_wna16_kernels

if TYPE_CHECKING:
    from engine.model.layers.linear import LinearBase

SQUEEZELLM_BITS = (4,)
_PF = 8  # codes per int32
_TABLE = 16  # entries per output channel (2 ** 4)


@dataclass(frozen=True, slots=True)
class SqueezeLLMConfig(QuantizationConfig):
    bits: int = 4
    name: str = "squeezellm"

    def get_linear_method(self, layer: LinearBase, prefix: str) -> LinearMethodBase:
        # SqueezeLLM quantizes every linear layer of the decoder (lm_head is an embedding-like head
        # that the model builds without a quant config)
        del layer, prefix
        return SqueezeLLMLinearMethod()


def dequantize_lut(
    codes: torch.Tensor,  # [out, in] uint8
    lookup_table: torch.Tensor,  # [out, 16] float32
    dtype: torch.dtype,
) -> torch.Tensor:  # [out, in] in dtype
    """w[o, i] = lookup_table[o, codes[o, i]]: the reference the method computes."""
    return torch.gather(lookup_table, 1, codes.long()).to(dtype)


class SqueezeLLMLinearMethod(LinearMethodBase):
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
        prefix = getattr(layer, "prefix", "")
        if input_size_per_partition % _PF:
            raise ValueError(
                f"SqueezeLLM layer {prefix}: input size {input_size_per_partition} is not a multiple of 8 "
                "(codes per int32)"
            )
        out = sum(output_partition_sizes)

        def register(name: str, tensor: torch.Tensor, attrs: dict, dtypes: tuple[torch.dtype, ...]) -> None:
            loader = _dtype_checked(weight_loader, f"{prefix}.{name}", dtypes)
            register_weight(layer, name, tensor, {**attrs, "weight_loader": loader})

        # [in / 8, out] int32, codes packed along the input
        register(
            "qweight",
            torch.empty(input_size_per_partition // _PF, out, dtype=torch.int32),
            {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "pack_factor": _PF},
            (torch.int32,),
        )
        # [out, 16] fp16 as stored (a bf16 model dtype would round the values)
        register(
            "lookup_table",
            torch.empty(out, _TABLE, dtype=torch.float16),
            {"output_dim": 0},
            (torch.float16, torch.bfloat16, torch.float32),
        )

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        qweight = layer.qweight.data  # [in / 8, out] int32
        in_features, out_features = qweight.shape[0] * _PF, qweight.shape[1]
        table = layer.lookup_table.data  # [out, 16]
        del layer.qweight, layer.lookup_table
        layer.lut_kernels = use_wna16_kernels(
            qweight.device.type, triton_wna16_available(), False, 4, in_features, out_features
        )
        if layer.lut_kernels:  # CUDA: the Triton kernels read the checkpoint's packing as it is
            layer.register_buffer("qweight", qweight)
            layer.register_buffer("lookup_table", table.to(torch.float16).contiguous())  # [out, 16]
            return
        layer.register_buffer("codes", unpack_rows(qweight, 4).t().contiguous())  # [out, in] uint8
        layer.register_buffer("lookup_table", table.float())  # [out, 16] float32

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.lut_kernels:
            return apply_lut(layer, x, bias)
        w = dequantize_lut(layer.codes, layer.lookup_table, x.dtype)  # [out, in]
        return F.linear(x, w, bias)


def _dtype_checked(weight_loader: WeightLoader, name: str, dtypes: tuple[torch.dtype, ...]) -> WeightLoader:
    """The loader, refusing a checkpoint tensor of another dtype (a float qweight would be cast to
    meaningless codes) with the tensor's name."""

    def load(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if loaded_weight.dtype not in dtypes:
            shown = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(
                f"{name}: a SqueezeLLM checkpoint stores it as {shown}; got {loaded_weight.dtype}"
            )
        weight_loader(param, loaded_weight, shard_id)

    return load
