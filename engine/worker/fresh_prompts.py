"""Which of a step's sequences are whole prompts with no cached context: the step's tail of them.

A prompt's first chunk with nothing cached before it (no prefix-cache hit, not a later chunk) attends
only to keys the step itself computes, so its attention can skip the paged cache
(ops.flash_prefill). The scheduler puts running sequences (decodes, later chunks) before the
requests it admits this step, so such prompts sit at the end of the step; `fresh_prompt_tail` finds
the longest run of them there. The layer then attends rows [0, token_start) with the paged kernel
over sequences [0, seq_start) and rows [token_start, num_tokens) with flash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(slots=True)
class FreshPromptTail:
    seq_start: int  # first sequence of the tail
    token_start: int  # its first token (query_start_loc[seq_start])
    num_tokens: int  # tokens in the tail
    max_len: int  # longest prompt chunk in the tail
    head_max_query_len: int  # over sequences [0, seq_start): the paged kernel's launch sizes
    head_max_seq_len: int
    # [tail seqs + 1] int32 on the device: the tail's cumulative lengths from 0, made once per step by
    # the first layer that asks (`cu_seqlens`)
    _cu_seqlens: torch.Tensor | None = field(default=None, repr=False)

    def cu_seqlens(self, query_start_loc: torch.Tensor) -> torch.Tensor:
        """The tail's cumulative lengths, from the step's [num_seqs + 1] query_start_loc."""
        if self._cu_seqlens is None:
            tail = query_start_loc[self.seq_start :]
            self._cu_seqlens = tail if self.token_start == 0 else tail - self.token_start
        return self._cu_seqlens


def fresh_prompt_tail(
    seq_lens: np.ndarray,  # [num_seqs] int: context length including this step's tokens
    query_start_loc: np.ndarray,  # [num_seqs + 1] int: cumulative query lengths
) -> FreshPromptTail | None:
    """The longest run of sequences at the end of the step whose whole context is this step's tokens
    (seq_len == query_len), or None if the last sequence is not one (or the step has none)."""
    num_seqs = int(seq_lens.shape[0])
    if num_seqs == 0:
        return None
    query_lens = np.diff(query_start_loc)
    fresh = seq_lens == query_lens  # [num_seqs]
    if not fresh[-1]:
        return None
    not_fresh = np.flatnonzero(~fresh)
    seq_start = int(not_fresh[-1]) + 1 if not_fresh.size else 0
    token_start = int(query_start_loc[seq_start])
    return FreshPromptTail(
        seq_start=seq_start,
        token_start=token_start,
        num_tokens=int(query_start_loc[-1]) - token_start,
        max_len=int(query_lens[seq_start:].max()),
        head_max_query_len=int(query_lens[:seq_start].max(initial=0)),
        head_max_seq_len=int(seq_lens[:seq_start].max(initial=0)),
    )
