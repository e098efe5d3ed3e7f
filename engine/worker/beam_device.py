"""Beam groups ranked on the device: the runner's side (the scheduler's: engine/core/beam_device.py).

Each beam of a device-ranked group is a row of a persistent pool, whose device tensors hold what the
host does not know until a step later: the row's block table (its full blocks, gathered from its
parent's), its last tail block, its parent's pool row, the token it feeds next and its score. A step:

  before the forward  (`prepare`, then `feed` once the step's inputs are on the device)
    - each row takes its parent's table and writes its own tail (and, at a block boundary, its copy
      of the parent's last tail) into it; the filled part of the parent's last tail is copied into
      the row's own block, token by token over every layer's K and V in one gather and one scatter;
    - the row's input id and block-table row in the step's inputs come from the pool;
  after the forward  (`rank`)
    - log_softmax of the rows' logits plus their scores, top num_candidates over each group's
      width x vocabulary (transformers' beam search does the same top-k), candidates ending in a stop
      token marked, and the first `width` others, in ranked order, become the group's rows: their
      score, token and parent row are written to the pool. Every candidate goes back to the host,
      which replays the same choice (engine/core/beam_search.py: BeamSearchState.advance).

The score of a candidate is a float32 sum of two float32 values, the correctly rounded result the
host's ranking computes too. Everything here is a handful of torch calls per step whatever the number
of groups (the groups are batched by width and candidate count); nothing waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.core.scheduler_output import DeviceBeamStep
from engine.worker.attention_metadata import StepInputs
from engine.worker.block_copy import copy_kv_rows


@dataclass(slots=True, eq=False)
class _Group:
    rows: list[int]  # pool rows, beam i's at rows[i]
    num_candidates: int
    stop_token_ids: list[int]
    adapter: Any = None  # its LoRA adapter (engine.lora.adapter.LoRAAdapter), held while it runs


@dataclass(slots=True, eq=False)
class BeamRows:
    """This step's device-ranked rows, in step order (after every other sequence of the step)."""

    steps: list[DeviceBeamStep]
    pool_rows: torch.Tensor  # [R] int64 on the device
    positions: list[int]  # [R] each row's position
    host_tables: list[list[int]]  # [R] the rows' block tables for the host's arrays (full blocks as 0s)
    adapters: list[Any]  # [R] each row's LoRA adapter (None: the base model)

    @property
    def num_rows(self) -> int:
        return len(self.positions)


def _to_device(array: np.ndarray | list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(array), dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class DeviceBeamPool:
    def __init__(self, max_rows: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.max_blocks = max_blocks
        self.tables = torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device)  # [P, max_blocks]
        self.tails = torch.zeros(max_rows, dtype=torch.int64, device=device)  # [P] last step's tail block
        self.parents = torch.zeros(max_rows, dtype=torch.int64, device=device)  # [P] parent's pool row
        self.tokens = torch.zeros(max_rows, dtype=torch.int64, device=device)  # [P] next input id
        self.scores = torch.zeros(max_rows, dtype=torch.float32, device=device)  # [P] cumulative logprob
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self.groups: dict[str, _Group] = {}

    def __len__(self) -> int:
        return len(self.groups)

    # ------------------------------------------------------------------ before the forward
    def prepare(
        self,
        finished: list[str],
        steps: list[DeviceBeamStep],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        stack: torch.Tensor | None,
        adapter_of: Callable[[Any], Any] | None = None,
    ) -> BeamRows | None:
        """Drop ended groups, set up new ones, and move every row of `steps` to its parent's sequence
        (tables, tails, KV of the filled tail). None when no group steps. `adapter_of`: a new group's
        LoRA request -> the runner's adapter (None: LoRA is off)."""
        for group_id in finished:
            group = self.groups.pop(group_id, None)
            if group is not None:
                self._free_rows.extend(group.rows)
        if not steps:
            return None
        starts = [s for s in steps if s.start is not None]
        if starts:
            self._start(starts, adapter_of)
        bs = self.block_size
        pool_rows: list[int] = []
        positions: list[int] = []
        host_tables: list[list[int]] = []
        adapters: list[Any] = []
        cols: list[np.ndarray] = []  # per group: [width, 2] the two table entries each row writes ...
        vals: list[np.ndarray] = []  # ... and their block ids
        copy_rows: list[np.ndarray] = []  # per copied token: its row in the step ...
        copy_dst: list[np.ndarray] = []  # ... and its destination slot
        copy_offsets: list[np.ndarray] = []  # ... and its offset in the block
        for step in steps:
            group = self.groups[step.group_id]
            width = step.width
            pos = step.position
            num_full = pos // bs
            first = len(pool_rows)
            pool_rows += group.rows
            positions += [pos] * width
            adapters += [group.adapter] * width
            host_tables += [[0] * num_full + [tail] for tail in step.tail_blocks]
            tails = np.asarray(step.tail_blocks, dtype=np.int64)  # [width]
            if pos % bs == 0:  # a boundary: the parent's last tail, full, is copied whole into a block
                dst = np.asarray(step.full_blocks, dtype=np.int64)
                cols.append(np.broadcast_to(np.array([num_full - 1, num_full]), (width, 2)))
                vals.append(np.stack((dst, tails), axis=1))
                count = bs
            else:  # its filled part is copied into the row's own tail
                dst = tails
                cols.append(np.full((width, 2), num_full))
                vals.append(np.stack((tails, tails), axis=1))
                count = pos % bs
            offsets = np.arange(count, dtype=np.int64)
            copy_rows.append(np.repeat(np.arange(first, first + width), count))
            copy_offsets.append(np.tile(offsets, width))
            copy_dst.append((dst[:, None] * bs + offsets).reshape(-1))
        vals_all = np.concatenate(vals)  # [R, 2]
        dev = self.device
        rows_t = _to_device(pool_rows, torch.int64, dev)  # [R]
        parents = self.parents[rows_t]  # [R] pool rows of the parents (last step's ranking)
        src_tails = self.tails[parents]  # [R] block of each parent's last tail
        tables = self.tables[parents]  # [R, max_blocks]
        tables.scatter_(
            1, _to_device(np.concatenate(cols), torch.int64, dev), _to_device(vals_all, torch.int32, dev)
        )
        self.tables[rows_t] = tables
        self.tails[rows_t] = _to_device(vals_all[:, 1], torch.int64, dev)
        row_of = _to_device(np.concatenate(copy_rows), torch.int64, dev)  # [C]
        offsets_t = _to_device(np.concatenate(copy_offsets), torch.int64, dev)  # [C]
        dst_slots = _to_device(np.concatenate(copy_dst), torch.int64, dev)  # [C]
        src_slots = src_tails[row_of] * bs + offsets_t  # [C]
        copy_kv_rows(kv_caches, stack, src_slots, dst_slots, token_slots=True)
        return BeamRows(steps, rows_t, positions, host_tables, adapters)

    def _start(self, starts: list[DeviceBeamStep], adapter_of: Callable[[Any], Any] | None) -> None:
        rows: list[int] = []
        table_rows: list[int] = []
        table_cols: list[int] = []
        table_vals: list[int] = []
        tails: list[int] = []
        tokens: list[int] = []
        scores: list[float] = []
        for step in starts:
            start = step.start
            assert start is not None
            if len(self._free_rows) < step.width:
                raise RuntimeError(f"beam group {step.group_id!r}: no free rows in the device beam pool")
            group_rows = [self._free_rows.pop() for _ in range(step.width)]
            adapter = None
            if start.lora_request is not None:
                if adapter_of is None:
                    raise RuntimeError(f"beam group {step.group_id!r} names an adapter, but LoRA is off")
                adapter = adapter_of(start.lora_request)
            self.groups[step.group_id] = _Group(
                group_rows, start.num_candidates, list(start.stop_token_ids), adapter
            )
            full = start.prompt_full_blocks
            for row in group_rows:
                table_rows += [row] * len(full)
                table_cols += range(len(full))
                table_vals += full
            rows += group_rows
            tails += [start.prompt_tail_block] * step.width
            tokens += start.token_ids
            scores += start.scores
        dev = self.device
        rows_t = _to_device(rows, torch.int64, dev)
        if table_rows:
            self.tables[
                _to_device(table_rows, torch.int64, dev), _to_device(table_cols, torch.int64, dev)
            ] = _to_device(table_vals, torch.int32, dev)
        self.tails[rows_t] = _to_device(tails, torch.int64, dev)
        self.parents[rows_t] = rows_t  # each row is its own parent: every one reads the prompt's tail
        self.tokens[rows_t] = _to_device(tokens, torch.int64, dev)
        self.scores[rows_t] = _to_device(scores, torch.float32, dev)  # float32 values: exact

    def feed(self, beams: BeamRows, step: StepInputs, first_token: int, first_seq: int) -> None:
        """The rows' input ids and block-table rows in the step's device inputs (the host's arrays
        had placeholders): tokens `first_token ...`, sequences `first_seq ...` of the flat batch."""
        n = beams.num_rows
        step.input_ids[first_token : first_token + n] = self.tokens[beams.pool_rows]
        tables = step.metadata.block_tables  # [num_seqs, width]
        width = min(int(tables.shape[1]), self.max_blocks)
        tables[first_seq : first_seq + n, :width] = self.tables[beams.pool_rows, :width]

    # ------------------------------------------------------------------ after the forward
    def rank(self, beams: BeamRows, logits: torch.Tensor) -> tuple[list[str], list[int], torch.Tensor]:
        """logits: [R, vocab] of the rows, in step order. Updates the pool's scores, tokens and parents
        for the next step; returns (group ids, candidates per group, [sum, 3] float64 candidates:
        score, parent (the beam's index in its group), token id), groups in the returned order."""
        vocab = logits.shape[-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
        acc_all = logprobs + self.scores[beams.pool_rows][:, None]  # [R, V] float32
        # Groups of one (width, candidates) rank together.
        buckets: dict[tuple[int, int], list[tuple[str, int]]] = {}
        first = 0
        for step in beams.steps:
            group = self.groups[step.group_id]
            buckets.setdefault((step.width, group.num_candidates), []).append((step.group_id, first))
            first += step.width
        group_ids: list[str] = []
        counts: list[int] = []
        outs: list[torch.Tensor] = []
        dev = self.device
        for (width, num_cand), members in buckets.items():
            starts = np.array([f for _, f in members], dtype=np.int64)
            index = _to_device(starts[:, None] + np.arange(width), torch.int64, dev)  # [G, k] step rows
            num_groups = len(members)
            stops = [self.groups[g].stop_token_ids for g, _ in members]
            longest = max(1, max(map(len, stops)))
            stop_ids = _to_device([s + [-1] * (longest - len(s)) for s in stops], torch.int64, dev)  # [G, S]
            acc = acc_all[index].view(num_groups, width * vocab)  # [G, k * V]
            num_top = min(num_cand, width * vocab)
            values, flat = acc.topk(num_top, dim=1)  # [G, N] best first
            parent = flat // vocab  # [G, N] beam index in the group
            token = flat % vocab  # [G, N]
            hit = (token[:, :, None] == stop_ids[:, None, :]).any(-1)  # [G, N]
            runs = ~hit
            keep = runs & (runs.cumsum(1) <= width)  # the first `width` candidates that run on
            place = torch.arange(num_top, device=dev).expand(num_groups, num_top)
            chosen = torch.where(keep, place, place + num_top).argsort(dim=1)[:, :width]  # [G, k]
            pool = beams.pool_rows[index]  # [G, k] pool rows of the group's beams
            self.scores[pool] = values.gather(1, chosen)
            self.tokens[pool] = token.gather(1, chosen)
            self.parents[pool] = pool.gather(1, parent.gather(1, chosen))
            outs.append(torch.stack((values.double(), parent.double(), token.double()), dim=-1).view(-1, 3))
            group_ids += [g for g, _ in members]
            counts += [num_top] * num_groups
        return group_ids, counts, torch.cat(outs)
