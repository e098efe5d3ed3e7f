"""Per-step attention metadata: built once per step on the CPU (numpy), moved to the device in ONE
host->device copy, and read by every Attention layer through the forward context.

`build_step_inputs` is the only constructor: the CUDA-graph runner will later give it static device
buffers to copy into (padding tokens get slot -1 so they write nothing); nothing else builds these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: KV-cache slot of each token; -1 = padding (no write)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32: block ids; unused entries 0
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths (0, q0, q0+q1, ...)
    positions: torch.Tensor  # [num_tokens] int64: position of each token in its sequence
    max_query_len: int  # max over sequences of this step's token count
    max_seq_len: int  # max over sequences of seq_lens
    num_actual_tokens: int  # tokens before padding (== num_tokens until CUDA graphs pad the batch)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64 (same tensor as metadata.positions)
    logits_indices: torch.Tensor  # [num_logits_rows] int64: rows of the hidden states to project to logits
    metadata: AttentionMetadata


def build_step_inputs(
    *,
    input_ids: np.ndarray,  # [num_tokens] int64
    positions: np.ndarray,  # [num_tokens] int64
    slot_mapping: np.ndarray,  # [num_tokens] int64
    block_tables: np.ndarray,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: np.ndarray,  # [num_seqs] int32
    query_start_loc: np.ndarray,  # [num_seqs + 1] int32
    logits_indices: np.ndarray,  # [num_logits_rows] int64
    device: torch.device,
) -> StepInputs:
    """Pack every array into one int64 host buffer, copy it to `device` once, and slice it back."""
    num_tokens = int(input_ids.shape[0])
    num_seqs = int(seq_lens.shape[0])
    parts = (
        input_ids,
        positions,
        slot_mapping,
        seq_lens,
        query_start_loc,
        logits_indices,
        block_tables.ravel(),
    )
    sizes = [int(p.size) for p in parts]
    host = torch.from_numpy(np.concatenate([p.astype(np.int64, copy=False).ravel() for p in parts]))
    if device.type == "cuda":
        host = host.pin_memory()
        buf = host.to(device, non_blocking=True)
    else:
        buf = host
    views = torch.split(buf, sizes)
    ids_t, pos_t, slots_t, seq_lens_t, qsl_t, logits_t, bt_t = views
    q_lens = np.diff(query_start_loc) if num_seqs else np.zeros(0, dtype=np.int32)
    metadata = AttentionMetadata(
        slot_mapping=slots_t,
        block_tables=bt_t.view(block_tables.shape).to(torch.int32),
        seq_lens=seq_lens_t.to(torch.int32),
        query_start_loc=qsl_t.to(torch.int32),
        positions=pos_t,
        max_query_len=int(q_lens.max()) if num_seqs else 0,
        max_seq_len=int(seq_lens.max()) if num_seqs else 0,
        num_actual_tokens=num_tokens,
    )
    return StepInputs(input_ids=ids_t, positions=pos_t, logits_indices=logits_t, metadata=metadata)


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
            "no attention metadata: run the model inside engine.attention_metadata.forward_context"
        )
    return _current
