"""The step's adapter segments: runs of consecutive tokens on one adapter slot, for the segment LoRA
kernels (ops/triton/lora_segments.py).

The scheduler orders a step's requests by adapter (LoRAManager.group_by_adapter), so each adapter's
tokens form one run of the flat batch (a request's tokens are always contiguous). The kernels give
each run its own program instead of giving each tile of tokens a loop over every slot in it: with 64
adapters in a 256-token decode step, the tile kernels' loops (one weight tile load after another)
took 19 ms of a 31 ms step on an H200, the base model's kernels 12.

Format: one int32 array [1 + 3 * num_segments]:
    [num_segments, start_0, end_0, slot_0, start_1, end_1, slot_1, ...]
in token order; tokens without an adapter (slot -1) belong to no segment. A run longer than
`piece` tokens is cut into pieces of at most `piece`, so long prompts spread over programs too.
A token never belongs to two segments, so every output row is written by one program (no atomics).
"""

from __future__ import annotations

import numpy as np

# Tokens per segment piece: decode-sized steps (CUDA graphs are at most 512 tokens) cut runs into
# short pieces, one program each; larger (prefill) steps into longer ones, so a prompt's tokens do
# not read their adapter's weights once per 16 tokens. The kernels' launch rule reads the piece too
# (ops.triton.lora_segments.segment_launch: DECODE_PIECE is SMALL_PIECE).
SMALL_STEP_TOKENS = 512
SMALL_PIECE = 16
LARGE_PIECE = 64


def segment_piece(num_tokens: int) -> int:
    """Most tokens in one segment for a forward of `num_tokens` tokens (padding included)."""
    return SMALL_PIECE if num_tokens <= SMALL_STEP_TOKENS else LARGE_PIECE


def max_segment_entries(max_num_tokens: int) -> int:
    """int32 entries the segment array of any step up to `max_num_tokens` tokens can need."""
    return 1 + 3 * max_num_tokens  # at most one segment per token


def build_segments(token_slots: np.ndarray, piece: int) -> np.ndarray:
    """token_slots [n] int (-1: no adapter) -> the segment array (format above), int32."""
    n = int(token_slots.shape[0])
    if n == 0:
        return np.zeros(1, dtype=np.int32)
    change = np.flatnonzero(token_slots[1:] != token_slots[:-1]) + 1
    starts = np.concatenate(([0], change))  # [runs]
    ends = np.concatenate((change, [n]))
    slots = token_slots[starts]
    keep = slots >= 0
    starts, ends, slots = starts[keep], ends[keep], slots[keep]
    pieces = -(-(ends - starts) // piece)  # [runs]: pieces per run
    total = int(pieces.sum())
    first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)  # [total]: index of its run's first piece
    seg_starts = np.repeat(starts, pieces) + piece * (np.arange(total) - first_piece)
    seg_ends = np.minimum(seg_starts + piece, np.repeat(ends, pieces))
    out = np.empty(1 + 3 * total, dtype=np.int32)
    out[0] = total
    out[1::3] = seg_starts
    out[2::3] = seg_ends
    out[3::3] = np.repeat(slots, pieces)
    return out
