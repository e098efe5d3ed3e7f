"""Linear layers that know about tensor parallelism, quantization and (later) LoRA, so model files
never change when any of them arrives.

- Every layer takes `tp_rank`/`tp_size` (default 0/1) and computes its shard sizes from them.
  Column-parallel layers split the output dimension, row-parallel ones the input dimension.
- Every layer takes `prefix`, its dotted name in the model (`model.layers.0.mlp.down_proj`), and a
  `quant_config` (engine.model.quantization; None = unquantized). The config's
  `get_linear_method(layer, prefix)` picks this layer's method, held as `layer.quant_method`; the
  method creates the parameters (`create_weights`), applies them (`apply(layer, x, bias)`) and gets
  `process_weights_after_loading(layer)` once after loading (engine.model.weight_loader runs it).
- Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which copies this
  rank's slice of a checkpoint tensor into it, plus the layout metadata of engine.model.parameter
  (output_dim, input_dim, packed_dim, pack_factor). The loaders here slice by that metadata, never by
  an assumed [out, in] float shape, so a method's packed int32 qweight or group-wise scales load and
  shard the same way. A parameter without `output_dim` (column) / `input_dim` (row) is copied whole.
  Fused layers take a `shard_id`: "q"/"k"/"v" for QKVParallelLinear, the index of the sub-matrix
  (0 = gate, 1 = up) for MergedColumnParallelLinear; sizes and offsets are in logical units and are
  converted along the packed axis.

LoRA (engine.lora.layers.LoRALinear) is a hook, not a method: attached after loading as `layer.lora`,
it runs the layer's method and adds the batched LoRA term to its output in place, before the
row-parallel all-reduce (the partial LoRA products of each rank sum there like the base's). So LoRA
composes with any quantization method and tensor parallelism, and parameters and loaders are untouched.
At one token inside CUDA graphs an unquantized layer's hook may instead run one GEMV that adds the term
in its epilogue (engine.lora.gemv).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.model.checkpoint_slice import materialize
from engine.model.parameter import (
    WeightShapeError,
    default_weight_loader,
    param_units,
    set_weight_attrs,
)
from engine.model.quantization import LinearMethodBase, QuantizationConfig, UnquantizedLinearMethod

# Re-exported: layers and tests import them from here.
__all__ = [
    "ColumnParallelLinear",
    "LinearBase",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RowParallelLinear",
    "WeightShapeError",
    "default_weight_loader",
    "set_weight_attrs",
]

_UNQUANTIZED = UnquantizedLinearMethod()


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by tp_size ({denominator})")
    return numerator // denominator


class LinearBase(nn.Module):
    # The loaders below only narrow and copy: the checkpoint loader may hand them a CheckpointSlice
    # (engine.model.checkpoint_slice) so that a rank reads only its shard from the file.
    accepts_checkpoint_slices = True

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        params_dtype: torch.dtype | None,
        quant_config: QuantizationConfig | None,
        tp_rank: int,
        tp_size: int,
        prefix: str,
    ) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}); got {tp_rank}")
        self.input_size = input_size
        self.output_size = output_size
        self.has_bias = bias
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.quant_config = quant_config
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.prefix = prefix
        self.lora: nn.Module | None = None  # engine.lora.layers.LoRALinear, attached after loading

    def _create_weights(self, input_size_per_partition: int, output_partition_sizes: list[int]) -> None:
        """Ask the config for this layer's method (the partition sizes are known by now) and let it
        create the parameters."""
        config = self.quant_config
        method = config.get_linear_method(self, self.prefix) if config is not None else _UNQUANTIZED
        self.quant_method: LinearMethodBase = method
        method.create_weights(
            self,
            input_size_per_partition,
            output_partition_sizes,
            self.input_size,
            self.output_size,
            self.params_dtype,
            self.weight_loader,
        )

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        raise NotImplementedError


class ColumnParallelLinear(LinearBase):
    """y = x W^T + b with W split along the output dimension: each rank computes a slice of y.

    With tp_size > 1 the output stays sharded (the next RowParallelLinear consumes it); gathering is
    not implemented.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        output_sizes: list[int] | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, bias, params_dtype, quant_config, tp_rank, tp_size, prefix)
        self.output_sizes = output_sizes or [output_size]  # logical sub-matrices (fused layers)
        self.output_size_per_partition = _divide(output_size, tp_size, "output_size")
        self.output_partition_sizes = [_divide(s, tp_size, "output shard size") for s in self.output_sizes]
        self._create_weights(input_size, self.output_partition_sizes)
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.output_size_per_partition, dtype=self.params_dtype), requires_grad=False
            )
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def _load_slice(
        self,
        param: torch.Tensor,
        loaded_weight: torch.Tensor,
        param_offset: int,
        shard_size: int,
        checkpoint_rows: int,
        checkpoint_start: int,
    ) -> None:
        """Copy rows [checkpoint_start, +shard_size) of a checkpoint tensor with `checkpoint_rows` rows
        into rows [param_offset, +shard_size) of `param`, along its output_dim. All four are logical
        sizes, converted to stored elements where the parameter is packed along that axis."""
        dim = getattr(param, "output_dim", None)
        if dim is None:  # whole on every rank (e.g. a g_idx): each shard's copy is the same tensor
            default_weight_loader(param, loaded_weight)
            return
        param_offset, shard_size, checkpoint_rows, checkpoint_start = (
            param_units(param, dim, n) for n in (param_offset, shard_size, checkpoint_rows, checkpoint_start)
        )
        expected = list(param.shape)
        expected[dim] = checkpoint_rows
        if tuple(loaded_weight.shape) != tuple(expected):
            raise WeightShapeError(tuple(expected), tuple(loaded_weight.shape))
        src = loaded_weight.narrow(dim, checkpoint_start, shard_size)
        param.data.narrow(dim, param_offset, shard_size).copy_(materialize(src))

    def _load_fused(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, sizes: list[int], shard_ids: list[Any]
    ) -> None:
        """An already-fused checkpoint tensor (sub-matrices of logical `sizes` stacked along the output):
        split it and load each part as its shard."""
        dim = getattr(param, "output_dim", None)
        if dim is None:
            default_weight_loader(param, loaded_weight)
            return
        stored = [param_units(param, dim, size) for size in sizes]
        if loaded_weight.dim() != param.dim() or loaded_weight.shape[dim] != sum(stored):
            expected = list(param.shape)
            expected[dim] = sum(stored)
            raise WeightShapeError(tuple(expected), tuple(loaded_weight.shape))
        offset = 0
        for shard_id, size in zip(shard_ids, stored, strict=True):
            self.weight_loader(param, loaded_weight.narrow(dim, offset, size), shard_id)
            offset += size

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard_id; got {shard_id!r}")
        shard = self.output_size_per_partition
        self._load_slice(param, loaded_weight, 0, shard, self.output_size, self.tp_rank * shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is not None:  # the hook runs the method (or a fused GEMV) and adds the LoRA term
            return self.lora.forward_layer(self, x, self.bias)
        return self.quant_method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices with the same input fused into one (gate_proj + up_proj).

    shard_id is the index into `output_sizes`; each rank holds its slice of every sub-matrix, in order.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        prefix: str = "",
    ) -> None:
        super().__init__(
            input_size,
            sum(output_sizes),
            bias,
            params_dtype,
            quant_config,
            tp_rank,
            tp_size,
            output_sizes=list(output_sizes),
            prefix=prefix,
        )

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of a [gate, up] projection in its matmul's own launch, [num_tokens, half], where
        the quant method has such a path for x (decode batches on a GEMV); None otherwise (then forward
        and the activation kernel): with a bias, other than two equal halves, or in a step with LoRA
        adapters (a gated LoRA GEMV measured slower than the LoRA GEMV and the activation kernel: A3
        5.10 ms vs 5.00 on an H200 at 4f07a81). A step without adapters (a graph variant without the
        LoRA term) takes the method's gated launch: the hook would add nothing."""
        sizes = self.output_partition_sizes
        if self.has_bias or len(sizes) != 2 or sizes[0] != sizes[1]:
            return None
        if self.lora is not None and self.lora.batch.active:
            return None
        return self.quant_method.apply_silu_mul(self, x)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor: split it and load each part
            self._load_fused(param, loaded_weight, self.output_sizes, list(range(len(self.output_sizes))))
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be in [0, {len(self.output_sizes)}); got {shard_id!r}")
        shard = self.output_partition_sizes[shard_id]
        param_offset = sum(self.output_partition_sizes[:shard_id])
        self._load_slice(
            param, loaded_weight, param_offset, shard, self.output_sizes[shard_id], self.tp_rank * shard
        )


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections fused into one column-parallel matrix: [q | k | v] per rank.

    Query heads are split across ranks; KV heads too, or replicated when tp_size > num_kv_heads.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        prefix: str = "",
    ) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "num_heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = _divide(tp_size, total_num_kv_heads, "tp_size over num_kv_heads")
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "num_kv_heads")
            self.num_kv_head_replicas = 1
        # the first of this rank's KV heads in the checkpoint's order (its K/V rows, its per-head scales)
        self.kv_head_offset = (tp_rank // self.num_kv_head_replicas) * self.num_kv_heads
        q_size = self.num_heads * head_size
        kv_size = self.num_kv_heads * head_size
        self.q_size, self.kv_size = q_size, kv_size
        # The per-rank output is [q | k | v]; ColumnParallelLinear divides the totals by tp_size.
        super().__init__(
            hidden_size,
            (q_size + 2 * kv_size) * tp_size,
            bias,
            params_dtype,
            quant_config,
            tp_rank,
            tp_size,
            output_sizes=[q_size * tp_size, kv_size * tp_size, kv_size * tp_size],
            prefix=prefix,
        )

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        hd = self.head_size
        if shard_id is None:  # an already-fused qkv checkpoint tensor
            sizes = [self.total_num_heads * hd, self.total_num_kv_heads * hd, self.total_num_kv_heads * hd]
            self._load_fused(param, loaded_weight, sizes, ["q", "k", "v"])
            return
        if shard_id == "q":
            param_offset, shard, rows = 0, self.q_size, self.total_num_heads * hd
            start = self.tp_rank * self.q_size
        elif shard_id in ("k", "v"):
            param_offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            shard, rows = self.kv_size, self.total_num_kv_heads * hd
            start = self.kv_head_offset * hd
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v'; got {shard_id!r}")
        self._load_slice(param, loaded_weight, param_offset, shard, rows, start)


class RowParallelLinear(LinearBase):
    """y = x W^T + b with W split along the input dimension: each rank holds a partial sum, reduced
    across ranks (torch.distributed all-reduce when tp_size > 1). The bias is added once, on rank 0."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        reduce_results: bool = True,
        prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, bias, params_dtype, quant_config, tp_rank, tp_size, prefix)
        self.input_size_per_partition = _divide(input_size, tp_size, "input_size")
        self.reduce_results = reduce_results
        self._create_weights(self.input_size_per_partition, [output_size])
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=self.params_dtype), requires_grad=False)
            set_weight_attrs(self.bias, {"weight_loader": default_weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is not None:
            raise ValueError(f"RowParallelLinear takes no shard_id; got {shard_id!r}")
        dim = getattr(param, "input_dim", None)
        if dim is None:  # whole on every rank (e.g. per-output-channel scales)
            default_weight_loader(param, loaded_weight)
            return
        expected = list(param.shape)
        expected[dim] = param_units(param, dim, self.input_size)
        if tuple(loaded_weight.shape) != tuple(expected):
            raise WeightShapeError(tuple(expected), tuple(loaded_weight.shape))
        shard = param_units(param, dim, self.input_size_per_partition)
        param.data.copy_(materialize(loaded_weight.narrow(dim, self.tp_rank * shard, shard)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        if self.lora is not None:  # the LoRA term joins this rank's partial sum, before the all-reduce
            out = self.lora.forward_layer(self, x, bias)
        else:
            out = self.quant_method.apply(self, x, bias)
        if self.tp_size > 1 and self.reduce_results:
            torch.distributed.all_reduce(out)
        return out
