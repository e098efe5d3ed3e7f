"""The runner's block tables kept as rows of one int32 array, each written once as its blocks come.

A step's block table ([sequences, longest table] int32, zero-padded) used to be rebuilt from every
running request's list of block ids: one numpy fromiter over all of them, ~350 us a step on a CI-class
CPU at T1's decode shape (144 sequences of ~55 blocks), the largest piece of input building. Here each
request holds a row of a persistent array; a step writes only the blocks added since the last one (a
block every `block_size` tokens a sequence) and gathers the scheduled rows with one fancy index (~11
us at that shape).

Lazy by design: `RequestState.block_ids` stays the runner's source of truth, and `sync` copies into the
row whatever it has not copied yet (`RequestState.table_len` counts those entries; a copy-on-write that
replaces entry i lowers it to i). A row given back is zeroed over what it held, so a row never holds
anything past its request's blocks: the gathered table equals `block_table_array`'s entry for entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from engine.worker.input_batch import RequestState


class BlockTableRows:
    """Rows of block ids, one a running request, grown (doubled) when more requests or longer tables
    need them."""

    def __init__(self, width: int, capacity: int = 64) -> None:
        self.table = np.zeros((max(capacity, 1), max(width, 1)), dtype=np.int32)  # [rows, max blocks]
        self._free = list(range(self.table.shape[0] - 1, -1, -1))  # popped from the end: row 0 first

    def __len__(self) -> int:
        """Rows in use."""
        return self.table.shape[0] - len(self._free)

    def sync(self, state: RequestState) -> int:
        """Give `state` a row if it has none, copy its block ids not copied yet; returns its row."""
        row = state.table_row
        if row < 0:
            row = state.table_row = self._take()
            state.table_len = 0
        blocks = state.block_ids
        done = state.table_len
        if done != len(blocks):
            if len(blocks) > self.table.shape[1]:
                self._widen(len(blocks))
            self.table[row, done : len(blocks)] = blocks[done:]
            state.table_len = len(blocks)
        return row

    def release(self, state: RequestState) -> None:
        """The request left the runner: zero what its row held and free it."""
        row = state.table_row
        if row < 0:
            return
        self.table[row, : state.table_len] = 0
        state.table_row, state.table_len = -1, 0
        self._free.append(row)

    def gather(self, rows: list[int], num_rows: int, width: int) -> np.ndarray:
        """[num_rows, max(1, width)] int32: the given rows' first `width` entries in order, then zero rows
        (the padding of a CUDA-graph batch). `width` must cover every row's blocks (the longest table)."""
        out = np.zeros((num_rows, max(width, 1)), dtype=np.int32)
        if rows:
            out[: len(rows), :width] = self.table[rows, :width]
        return out

    def _take(self) -> int:
        if not self._free:
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def _widen(self, width: int) -> None:
        wider = np.zeros((self.table.shape[0], max(width, 2 * self.table.shape[1])), dtype=np.int32)
        wider[:, : self.table.shape[1]] = self.table
        self.table = wider
