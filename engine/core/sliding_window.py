"""Which KV blocks a sequence of a sliding-window model can still read. Plain Python, no torch.

Applies where every attention layer has the same window W (Mistral's, Mixtral's and Phi-3's
`sliding_window`, Qwen with the window on every layer: `CacheConfig.sliding_window`); a model that
mixes full and windowed layers reads its whole context through the one block table, so nothing is
released for it.

The window, as transformers' masks and every kernel path (ops/reference.py `paged_attention`): a
query at position p reads the keys at positions p - W + 1 .. p. A sequence whose first c tokens are
computed only ever runs queries at positions >= c again (a prefill chunk starts at c, a decode is at
c; recompute after preemption starts over from a new table), so no query of it, now or later, reads
a key before c - W + 1: the blocks wholly before the block holding that key can go back to the pool.
The KV cache manager releases them and puts `NULL_BLOCK` in their place in the table
(engine/core/kv_cache_manager.py); the kernels never load a key before their first query's window, so
they never read such an entry (ops/triton/paged_attention.py, ops/reference.py).

A prefix-cache hit then needs only the blocks the first computed query's window reaches, not the whole
prefix: `longest_window_hit` finds the longest prefix whose window blocks are all cached, the blocks
before them standing in as nulls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

_Block = TypeVar("_Block")


def first_live_block(num_computed_tokens: int, window: int, block_size: int) -> int:
    """The first block of a table that a query at position `num_computed_tokens` (or any later one)
    reads; the blocks before it are dead to the sequence."""
    first_key = num_computed_tokens - window + 1
    return first_key // block_size if first_key > 0 else 0


def max_blocks_held(num_tokens: int, block_size: int, window: int | None, max_chunk_tokens: int) -> int:
    """The most blocks one sequence of `num_tokens` tokens holds at once, computing at most
    `max_chunk_tokens` a step: all of them without a window; with one, the blocks from the window's
    first live block (of the chunk's first query) to the chunk's last token, cdiv(W - 1 + chunk, B) + 1
    at most (the window's start may sit anywhere in its block)."""
    full = -(-num_tokens // block_size)
    if window is None:
        return full
    chunk = min(max_chunk_tokens, num_tokens)
    return min(full, -(-(window - 1 + chunk) // block_size) + 1)


def longest_window_hit(
    cached: Callable[[int], _Block | None], num_blocks: int, window: int, block_size: int
) -> tuple[int, list[_Block]]:
    """The longest prefix-cache hit of at most `num_blocks` leading full blocks that a windowed
    sequence can use: (first, blocks), where `blocks` are the cached blocks first .. k - 1 and the
    first computed query (position k * block_size) reads nothing before block `first`.

    `cached(i)` is the cached block holding the sequence's block i, or None. Searched from the longest
    candidate down: a miss at block i rules out every prefix whose window holds i, so the next
    candidate ends at i. Each block is looked up at most once.
    """
    end = num_blocks
    while end > 0:
        first = first_live_block(end * block_size, window, block_size)
        found: list[_Block] = []
        i = end - 1
        while i >= first:
            block = cached(i)
            if block is None:
                break
            found.append(block)
            i -= 1
        if i < first:
            found.reverse()
            return first, found
        end = i
    return 0, []
