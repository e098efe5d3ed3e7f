"""A read-only view of the first `n` items of an append-only list: an O(1) snapshot.

A "cumulative" stream's output after every step carries the sequence so far (token ids, logprobs).
Copying the history into each output costs O(length) per step, O(length²) over a generation; the
history only ever grows at the end, so a view fixed at today's length reads exactly what a copy
would, whenever the consumer gets to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar, overload

T = TypeVar("T")


class PrefixView(Sequence[T]):
    """`items[:length]` without the copy. `items` must only be appended to while views exist."""

    __slots__ = ("_items", "_len")

    def __init__(self, items: list[T], length: int) -> None:
        self._items = items
        self._len = length

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._len)
            if step == 1:
                return self._items[start:stop]
            return [self._items[i] for i in range(start, stop, step)]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("PrefixView index out of range")
        return self._items[index]

    def __iter__(self) -> Iterator[T]:
        return islice(self._items, self._len)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, PrefixView)):
            return len(other) == self._len and all(a == b for a, b in zip(self, other, strict=False))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return repr(self._items[: self._len])

    def to_list(self) -> list[T]:
        return self._items[: self._len]

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (self.to_list(),))  # pickles as the list it shows
