"""A view of one safetensors tensor that reads only the part a rank keeps.

With tensor parallelism each rank loads only its shard: a column-parallel rank its rows, a
row-parallel rank its columns, a vocab-parallel rank its vocabulary rows. The loaders in
engine.model.layers narrow a checkpoint tensor to that part before copying it; given a
`CheckpointSlice` instead of a tensor, the same `narrow` calls only move bounds, and `materialize`
reads the remaining window from the file (safetensors' get_slice), never the whole tensor.

Only loaders that declare `accepts_checkpoint_slices` get one (the parallel layers' own loaders);
every other loader (a quantization method's repacking loader) gets a plain tensor, so it may use any
tensor operation.
"""

from __future__ import annotations

from typing import Any

import torch


class CheckpointSlice:
    """The window `bounds` ([start, stop) per dim) of a tensor opened with safe_open(...).get_slice."""

    __slots__ = ("_source", "_bounds")

    def __init__(self, source: Any, bounds: list[tuple[int, int]] | None = None) -> None:
        self._source = source  # a safetensors slice: get_shape() and [slices] -> torch.Tensor
        self._bounds = bounds if bounds is not None else [(0, n) for n in source.get_shape()]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self._bounds)

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype, read from an empty window (no data)."""
        if not self._bounds:
            return self._source[()].dtype
        return self._source[tuple(slice(0, 0) for _ in self._bounds)].dtype

    def dim(self) -> int:
        return len(self._bounds)

    def numel(self) -> int:
        return self.shape.numel()

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        """torch.narrow's meaning; reads nothing."""
        lo, hi = self._bounds[dim]
        if start < 0 or length < 0 or lo + start + length > hi:
            raise IndexError(f"narrow({dim}, {start}, {length}) out of range for shape {tuple(self.shape)}")
        bounds = list(self._bounds)
        bounds[dim] = (lo + start, lo + start + length)
        return CheckpointSlice(self._source, bounds)

    def materialize(self) -> torch.Tensor:
        """Read the window from the file."""
        if not self._bounds:  # a scalar
            return self._source[()]
        return self._source[tuple(slice(start, stop) for start, stop in self._bounds)]


def materialize(weight: torch.Tensor | CheckpointSlice) -> torch.Tensor:
    """The tensor itself, or a slice's window read from its file."""
    return weight.materialize() if isinstance(weight, CheckpointSlice) else weight
