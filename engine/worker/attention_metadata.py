"""Per-step attention metadata: built once per step on the CPU (numpy), moved to the device in ONE
host->device copy, and read by every Attention layer through the forward context.

`build_step_inputs` is the only constructor. Every integer array of the step is written into one byte
buffer (a reused pinned host buffer on CUDA), copied to the device once (non_blocking), and sliced back
into typed views. The CUDA-graph runner passes its static device buffer as `out`: a graph captured for
batch size B reads views at the offsets `step_layout` gives for B, and a replay of B copies into exactly
those bytes (padding rows get slot -1 so they write nothing; see engine.worker.cuda_graphs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from engine.worker.fresh_prompts import FreshPromptTail, fresh_prompt_tail

# Every region starts on a 16-byte boundary: Triton specializes pointer arguments on 16-byte
# alignment, so aligned views keep one compiled variant per kernel whatever the batch shape.
_ALIGN = 16


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: KV-cache slot of each token; -1 = padding (no write)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32: block ids; unused entries 0
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths (0, q0, q0+q1, ...)
    positions: torch.Tensor  # [num_tokens] int64: position of each token in its sequence
    max_query_len: int  # max over sequences of this step's token count
    max_seq_len: int  # max over sequences of seq_lens (an upper bound under CUDA graphs: max_model_len)
    num_actual_tokens: int  # tokens before padding (== num_tokens unless a CUDA graph pads the batch)
    # Batch size of the CUDA graph that replays this step (the inputs sit in its static buffer);
    # None: the step runs eagerly.
    cuda_graph_size: int | None = None
    # True: that graph is a mixed-step graph (cuda_graph_size tokens in as many sequences).
    cuda_graph_mixed: bool = False
    # An eager step with prompt tokens, built with find_fresh_prompts: its tail of whole prompts without
    # cached context, which a layer may attend with flash instead of the paged kernel
    # (engine.worker.fresh_prompts); else None.
    fresh_prompts: FreshPromptTail | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64 (same tensor as metadata.positions)
    logits_indices: torch.Tensor  # [num_logits_rows] int64: rows of the hidden states to project to logits
    metadata: AttentionMetadata


# name, dtype, in the order they sit in the buffer. logits_indices comes last: its length varies between
# steps of one CUDA-graph size, and nothing a graph reads may move with it.
_FIELDS: tuple[tuple[str, np.dtype], ...] = (
    ("input_ids", np.dtype(np.int64)),
    ("positions", np.dtype(np.int64)),
    ("slot_mapping", np.dtype(np.int64)),
    ("seq_lens", np.dtype(np.int32)),
    ("query_start_loc", np.dtype(np.int32)),
    ("block_tables", np.dtype(np.int32)),
    ("logits_indices", np.dtype(np.int64)),
)
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def step_layout(
    num_tokens: int, num_seqs: int, block_table_width: int, num_logits_rows: int
) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """Byte offset and shape of every field in the packed step buffer, and the total bytes."""
    fields, nbytes = _layout(num_tokens, num_seqs, block_table_width, num_logits_rows)
    return {name: (offset, shape) for name, _, _, offset, _, shape in fields}, nbytes


@functools.lru_cache(maxsize=4096)
def _layout(
    num_tokens: int, num_seqs: int, block_table_width: int, num_logits_rows: int
) -> tuple[tuple[tuple[str, np.dtype, torch.dtype, int, int, tuple[int, ...]], ...], int]:
    """(name, numpy dtype, torch dtype, byte offset, bytes, shape) per field, and the total bytes.
    Cached: a serving process sees few distinct shapes, and this runs every step."""
    shapes: dict[str, tuple[int, ...]] = {
        "input_ids": (num_tokens,),
        "positions": (num_tokens,),
        "slot_mapping": (num_tokens,),
        "seq_lens": (num_seqs,),
        "query_start_loc": (num_seqs + 1,),
        "block_tables": (num_seqs, block_table_width),
        "logits_indices": (num_logits_rows,),
    }
    fields = []
    offset = 0
    for name, dtype in _FIELDS:
        shape = shapes[name]
        nbytes = math.prod(shape) * dtype.itemsize
        fields.append((name, dtype, _TORCH_DTYPES[dtype], offset, nbytes, shape))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return tuple(fields), offset


class PinnedStaging:
    """A pinned host buffer reused for every step's inputs (no pinned allocation per step).

    The buffer is rewritten only after the previous step's copy out of it has finished (an event,
    normally long done: the previous step's sampled ids already came back).
    """

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None  # [capacity] uint8, pinned
        self._event: torch.cuda.Event | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        if self._host is None or self._host.numel() < nbytes:
            capacity = max(nbytes, 2 * (self._host.numel() if self._host is not None else 0), 1 << 16)
            self._host = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        return self._host[:nbytes]

    def record_copy(self) -> None:
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record()


def build_step_inputs(
    *,
    input_ids: np.ndarray,  # [num_tokens] int64
    positions: np.ndarray,  # [num_tokens] int64
    slot_mapping: np.ndarray,  # [num_tokens] int64
    block_tables: np.ndarray,  # [num_seqs, w] int32
    seq_lens: np.ndarray,  # [num_seqs] int32
    query_start_loc: np.ndarray,  # [num_seqs + 1] int32
    logits_indices: np.ndarray,  # [num_logits_rows] int64
    device: torch.device,
    # Columns of the block table on the device (>= w). Columns past w are left as they were: the
    # attention kernel reads a row only up to its seq_len, so they are never read (CUDA graphs pass
    # max_blocks_per_seq here and copy rows only as wide as the batch needs).
    block_table_width: int | None = None,
    staging: PinnedStaging | None = None,  # CUDA: the reused pinned buffer (None: pin a fresh one)
    out: torch.Tensor | None = None,  # [>= nbytes] uint8 device buffer to copy into (CUDA graphs)
    num_actual_tokens: int | None = None,  # tokens before padding (default: all of them)
    max_query_len: int | None = None,  # when the caller knows it (default: from query_start_loc)
    max_seq_len: int | None = None,  # override (CUDA-graph capture passes max_model_len)
    cuda_graph_size: int | None = None,
    cuda_graph_mixed: bool = False,
    # Find an eager prompt step's tail of whole prompts (`AttentionMetadata.fresh_prompts`): only where a
    # layer may attend it apart (the backend's flash_prefill), so no other step pays for the search.
    find_fresh_prompts: bool = False,
    # With `out`: views of `out` by layout, reused across steps (the owner of `out` keeps it).
    view_cache: dict[tuple[int, int, int, int], dict[str, torch.Tensor]] | None = None,
) -> StepInputs:
    """Pack every array into one host byte buffer, copy it to `device` once, and slice it back."""
    num_tokens = int(input_ids.shape[0])
    num_seqs = int(seq_lens.shape[0])
    arrays = {
        "input_ids": input_ids,
        "positions": positions,
        "slot_mapping": slot_mapping,
        "seq_lens": seq_lens,
        "query_start_loc": query_start_loc,
        "block_tables": block_tables,
        "logits_indices": logits_indices,
    }
    width = int(block_tables.shape[1])
    table_width = width if block_table_width is None else block_table_width
    if table_width < width:
        raise ValueError(f"block_table_width {table_width} < the batch's {width} blocks per sequence")
    layout_key = (num_tokens, num_seqs, table_width, int(logits_indices.shape[0]))
    fields, nbytes = _layout(*layout_key)
    on_cuda = device.type == "cuda"
    if on_cuda:
        host = (
            staging.take(nbytes)
            if staging is not None
            else torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        )
    else:
        host = torch.empty(nbytes, dtype=torch.uint8)
    host_np = host.numpy()
    for name, dtype, _, offset, size, shape in fields:
        region = host_np[offset : offset + size].view(dtype)
        if name == "block_tables":
            region.reshape(shape)[:, :width] = block_tables
        else:
            region[:] = arrays[name]
    if on_cuda or out is not None:
        buf = out if out is not None else torch.empty(nbytes, dtype=torch.uint8, device=device)
        buf[:nbytes].copy_(host, non_blocking=on_cuda)
        if on_cuda and staging is not None:
            staging.record_copy()
    else:
        buf = host
    views = view_cache.get(layout_key) if view_cache is not None and out is not None else None
    if views is None:
        views = _typed_views(buf, fields, nbytes)
        if view_cache is not None and out is not None:
            view_cache[layout_key] = views
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if num_seqs else 0
    if max_query_len is None:
        max_query_len = int(np.diff(query_start_loc).max()) if num_seqs else 0
    metadata = AttentionMetadata(
        slot_mapping=views["slot_mapping"],
        block_tables=views["block_tables"],
        seq_lens=views["seq_lens"],
        query_start_loc=views["query_start_loc"],
        positions=views["positions"],
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        num_actual_tokens=num_tokens if num_actual_tokens is None else num_actual_tokens,
        cuda_graph_size=cuda_graph_size,
        cuda_graph_mixed=cuda_graph_mixed,
        fresh_prompts=(
            fresh_prompt_tail(seq_lens, query_start_loc)
            if find_fresh_prompts and cuda_graph_size is None and max_query_len > 1
            else None
        ),
    )
    return StepInputs(
        input_ids=views["input_ids"],
        positions=views["positions"],
        logits_indices=views["logits_indices"],
        metadata=metadata,
    )


def _typed_views(buf: torch.Tensor, fields: tuple, nbytes: int) -> dict[str, torch.Tensor]:
    """Two typed views of the whole buffer, then one slice per field (every offset is 16-aligned)."""
    typed = {torch.int64: buf[:nbytes].view(torch.int64), torch.int32: buf[:nbytes].view(torch.int32)}
    views = {}
    for name, _, torch_dtype, offset, size, shape in fields:
        itemsize = 8 if torch_dtype == torch.int64 else 4
        view = typed[torch_dtype][offset // itemsize : (offset + size) // itemsize]
        views[name] = view.view(shape) if len(shape) > 1 else view
    return views


# The metadata of the forward pass in flight, read by Attention layers. Set only through
# `forward_context`, by the runner (one forward at a time per process).
_current: AttentionMetadata | None = None


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError(
            "no attention metadata: run the model inside engine.worker.attention_metadata.forward_context"
        )
    return _current


def eager_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [num_tokens]
    positions: torch.Tensor,  # [num_tokens]
    metadata: AttentionMetadata,
) -> torch.Tensor:
    """The model's forward over a flat batch under its attention metadata -> [num_tokens, hidden].
    A function of the model, not a runner method, so the CUDA-graph runner can hold it (as a partial)
    without holding the runner."""
    with forward_context(metadata):
        return model(input_ids, positions)
