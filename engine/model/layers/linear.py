"""Linear layers that know about tensor parallelism and quantization, so model files never change
when either arrives.

- Every layer takes `tp_rank`/`tp_size` (default 0/1) and computes its shard sizes from them.
  Column-parallel layers split the output dimension, row-parallel ones the input dimension.
- Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which copies this
  rank's slice of a checkpoint tensor into it. Fused layers take a `shard_id`: "q"/"k"/"v" for
  QKVParallelLinear, the index of the sub-matrix (0 = gate, 1 = up) for MergedColumnParallelLinear.
- The weight itself is created and applied by a `LinearMethod` (`create_weights` / `apply`).
  `UnquantizedLinearMethod` is the default; GPTQ/AWQ methods (packed int weights + scales) and LoRA
  wrappers plug in by passing another method, with their own per-parameter weight loaders.

Shape mismatches raise `WeightShapeError` (a ValueError carrying both shapes); the checkpoint loader
adds the parameter and file names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class WeightShapeError(ValueError):
    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...], detail: str = "") -> None:
        self.expected = tuple(expected)
        self.got = tuple(got)
        super().__init__(f"expected checkpoint shape {self.expected}, got {self.got}{detail}")


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        setattr(param, key, value)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """Whole-tensor copy (replicated parameters: norms, unsharded biases)."""
    del shard_id
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise WeightShapeError(tuple(param.shape), tuple(loaded_weight.shape))
    param.data.copy_(loaded_weight)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by tp_size ({denominator})")
    return numerator // denominator


# ---------------------------------------------------------------------------------- linear methods
class LinearMethod:
    """How a linear layer stores and applies its weight. Subclass for quantization / LoRA."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: Callable[..., None],
    ) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: Callable[..., None],
    ) -> None:
        # [out_per_partition, in_per_partition], as torch.nn.Linear and HF checkpoints store it
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, "weight_loader": weight_loader})
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


# ---------------------------------------------------------------------------------- layers
class LinearBase(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        params_dtype: torch.dtype | None,
        linear_method: LinearMethod | None,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}); got {tp_rank}")
        self.input_size = input_size
        self.output_size = output_size
        self.has_bias = bias
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.tp_rank = tp_rank
        self.tp_size = tp_size


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
        linear_method: LinearMethod | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        output_sizes: list[int] | None = None,
    ) -> None:
        super().__init__(input_size, output_size, bias, params_dtype, linear_method, tp_rank, tp_size)
        self.output_sizes = output_sizes or [output_size]  # logical sub-matrices (fused layers)
        self.output_size_per_partition = _divide(output_size, tp_size, "output_size")
        self.output_partition_sizes = [_divide(s, tp_size, "output shard size") for s in self.output_sizes]
        self.linear_method.create_weights(
            self, input_size, self.output_partition_sizes, self.params_dtype, self.weight_loader
        )
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
        into rows [param_offset, +shard_size) of `param` (dim = the parameter's output_dim)."""
        dim = getattr(param, "output_dim", 0)
        expected = list(param.shape)
        expected[dim] = checkpoint_rows
        if tuple(loaded_weight.shape) != tuple(expected):
            raise WeightShapeError(tuple(expected), tuple(loaded_weight.shape))
        src = loaded_weight.narrow(dim, checkpoint_start, shard_size)
        param.data.narrow(dim, param_offset, shard_size).copy_(src)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard_id; got {shard_id!r}")
        shard = self.output_size_per_partition
        self._load_slice(param, loaded_weight, 0, shard, self.output_size, self.tp_rank * shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)


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
        linear_method: LinearMethod | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__(
            input_size,
            sum(output_sizes),
            bias,
            params_dtype,
            linear_method,
            tp_rank,
            tp_size,
            output_sizes=list(output_sizes),
        )

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor: split it and load each part
            dim = getattr(param, "output_dim", 0)
            if loaded_weight.shape[dim] != self.output_size:
                expected = list(param.shape)
                expected[dim] = self.output_size
                raise WeightShapeError(tuple(expected), tuple(loaded_weight.shape))
            offset = 0
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(dim, offset, size), i)
                offset += size
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
        linear_method: LinearMethod | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
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
        q_size = self.num_heads * head_size
        kv_size = self.num_kv_heads * head_size
        # The per-rank output is [q | k | v]; ColumnParallelLinear divides the totals by tp_size.
        super().__init__(
            hidden_size,
            (q_size + 2 * kv_size) * tp_size,
            bias,
            params_dtype,
            linear_method,
            tp_rank,
            tp_size,
            output_sizes=[q_size * tp_size, kv_size * tp_size, kv_size * tp_size],
        )
        self.q_size, self.kv_size = q_size, kv_size

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        hd = self.head_size
        if shard_id is None:  # an already-fused qkv checkpoint tensor
            dim = getattr(param, "output_dim", 0)
            sizes = [self.total_num_heads * hd, self.total_num_kv_heads * hd, self.total_num_kv_heads * hd]
            if loaded_weight.shape[dim] != sum(sizes):
                expected = list(param.shape)
                expected[dim] = sum(sizes)
                raise WeightShapeError(tuple(expected), tuple(loaded_weight.shape))
            offset = 0
            for sid, size in zip(("q", "k", "v"), sizes, strict=True):
                self.weight_loader(param, loaded_weight.narrow(dim, offset, size), sid)
                offset += size
            return
        if shard_id == "q":
            param_offset, shard, rows = 0, self.q_size, self.total_num_heads * hd
            start = self.tp_rank * self.q_size
        elif shard_id in ("k", "v"):
            param_offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            shard, rows = self.kv_size, self.total_num_kv_heads * hd
            start = (self.tp_rank // self.num_kv_head_replicas) * self.kv_size
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
        linear_method: LinearMethod | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        reduce_results: bool = True,
    ) -> None:
        super().__init__(input_size, output_size, bias, params_dtype, linear_method, tp_rank, tp_size)
        self.input_size_per_partition = _divide(input_size, tp_size, "input_size")
        self.reduce_results = reduce_results
        self.linear_method.create_weights(
            self, self.input_size_per_partition, [output_size], self.params_dtype, self.weight_loader
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=self.params_dtype), requires_grad=False)
            set_weight_attrs(self.bias, {"weight_loader": default_weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is not None:
            raise ValueError(f"RowParallelLinear takes no shard_id; got {shard_id!r}")
        dim = getattr(param, "input_dim", 1)
        expected = list(param.shape)
        expected[dim] = self.input_size
        if tuple(loaded_weight.shape) != tuple(expected):
            raise WeightShapeError(tuple(expected), tuple(loaded_weight.shape))
        shard = self.input_size_per_partition
        param.data.copy_(loaded_weight.narrow(dim, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        out = self.linear_method.apply(self, x, bias)
        if self.tp_size > 1 and self.reduce_results:
            torch.distributed.all_reduce(out)
        return out
