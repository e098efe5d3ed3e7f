"""What a parameter tells the weight loaders, so they never assume a parameter's shape or dtype.

Whoever creates a parameter (a layer, or a linear method's `create_weights`) sets these attributes on
it with `set_weight_attrs`:

- `weight_loader(param, loaded_weight, shard_id=None)`: copies this rank's part of one checkpoint
  tensor into the parameter (engine.model.weight_loader calls it for every tensor).
- `output_dim`: the axis a column-parallel layer splits across ranks (and along which fused layers
  stack their sub-matrices). Absent: the parameter is whole on every rank along the output.
- `input_dim`: the axis a row-parallel layer splits across ranks. Absent: whole on every rank.
- `packed_dim`, `pack_factor`: along `packed_dim`, one stored element stands for `pack_factor`
  logical ones. A GPTQ qweight [in / 8, out] int32 packs eight 4-bit values per element along the
  input: input_dim=0, output_dim=1, packed_dim=0, pack_factor=8. AWQ packs along the output
  (packed_dim = output_dim). Group-wise scales [in / group_size, out] are "packed" the same way with
  pack_factor = group_size. Loaders convert every logical size and offset along that axis with
  `param_units` before slicing.

Shape mismatches raise `WeightShapeError` (a ValueError carrying both shapes); the checkpoint loader
adds the parameter and file names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.model.checkpoint_slice import materialize

WeightLoader = Callable[..., None]  # (param, loaded_weight, shard_id=None) -> None


class WeightShapeError(ValueError):
    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...], detail: str = "") -> None:
        self.expected = tuple(expected)
        self.got = tuple(got)
        super().__init__(f"expected checkpoint shape {self.expected}, got {self.got}{detail}")


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        setattr(param, key, value)


def register_weight(layer: torch.nn.Module, name: str, tensor: torch.Tensor, attrs: dict[str, Any]) -> None:
    """A frozen parameter `name` on `layer` with the loader attributes `attrs` (output_dim, input_dim,
    packed_dim, pack_factor, weight_loader): what each linear method's create_weights registers."""
    param = torch.nn.Parameter(tensor, requires_grad=False)
    set_weight_attrs(param, attrs)
    layer.register_parameter(name, param)


def param_units(param: torch.Tensor, dim: int, logical: int) -> int:
    """A logical size or offset along `dim` -> stored elements (divided by pack_factor along the
    packed axis, unchanged along any other)."""
    if getattr(param, "packed_dim", None) != dim:
        return logical
    factor = param.pack_factor  # type: ignore[attr-defined]
    if logical % factor:
        raise ValueError(f"{logical} is not a multiple of the pack factor {factor} along packed dim {dim}")
    return logical // factor


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """Whole-tensor copy (replicated parameters: norms, unsharded biases, per-tensor scales)."""
    del shard_id
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise WeightShapeError(tuple(param.shape), tuple(loaded_weight.shape))
    param.data.copy_(materialize(loaded_weight))
