"""Copy-on-write of KV cache blocks: the copies the scheduler queued for a step, done before its forward.

Sequences that fork (parallel sampling, beam search) share their parent's blocks; the first to write
into a shared partial block gets a fresh one, and its KV must first hold the shared block's. The copy
runs eagerly on the device's stream before the step's forward pass (captured CUDA graphs included),
so it sees every earlier step's writes and precedes this step's. One gather and one scatter per cache
tensor (or over all of them, when they are views of one tensor), whatever the number of copies: every
source is read before any destination is written, so a block freed and handed out again within the
same step may be both a source and a destination.
"""

from __future__ import annotations

import torch


def copy_blocks_index(
    copies: list[tuple[int, int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) pairs -> ([num_copies] src ids, [num_copies] dst ids) int64 on the device."""
    index = torch.tensor(copies, dtype=torch.int64).T.contiguous()  # [2, num_copies]
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    return index[0], index[1]


def copy_kv_blocks(
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    copies: list[tuple[int, int]],
    stack: torch.Tensor | None = None,
) -> None:
    """cache[dst] = cache[src] for every (src, dst) in `copies`, in every layer's K and V cache
    ([num_blocks, block_size, num_kv_heads, head_dim]). `stack`: the tensor [num_layers, 2, num_blocks,
    ...] that every cache is a view of, if any: then one gather and one scatter in all (a beam step
    forks about half its beams, and two launches per cache were 4 x num_layers launches on the host)."""
    if not copies or not kv_caches:
        return
    src, dst = copy_blocks_index(copies, kv_caches[0][0].device)
    copy_kv_rows(kv_caches, stack, src, dst)


def copy_kv_rows(
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    stack: torch.Tensor | None,
    src: torch.Tensor,  # [C] int64 on the device
    dst: torch.Tensor,  # [C]
    token_slots: bool = False,
) -> None:
    """cache[dst] = cache[src] in every layer's K and V cache: `src` and `dst` index blocks, or with
    `token_slots` single token slots (block * block_size + offset; the device-ranked beams copy the
    filled part of a block). One gather and one scatter per cache, or over all of them with `stack`:
    every source is read before any destination is written."""
    if src.numel() == 0 or not kv_caches:
        return
    if stack is not None:
        raw = as_words(stack)  # [num_layers, 2, num_blocks, block_size, heads, dim * itemsize / word]
        if token_slots:  # a view: [num_layers, 2, num_blocks * block_size, heads, words]
            raw = raw.view(raw.shape[0], raw.shape[1], raw.shape[2] * raw.shape[3], *raw.shape[4:])
        raw.index_copy_(2, dst, raw.index_select(2, src))
        return
    for k_cache, v_cache in kv_caches:
        for cache in (k_cache, v_cache):
            raw = as_words(cache)  # [num_blocks, block_size, num_kv_heads, head_dim * itemsize / word]
            if token_slots:  # [num_blocks * block_size, heads, words]
                raw = raw.view(raw.shape[0] * raw.shape[1], *raw.shape[2:])
            raw.index_copy_(0, dst, raw.index_select(0, src))


def as_words(cache: torch.Tensor) -> torch.Tensor:
    """The cache's bytes as the widest integer words that divide its last dimension: the same copy for
    every cache dtype (fp8 caches included), and each thread of the index kernels moves a word, not a
    byte. As bytes, in B1's step on an H200 the index_copy kernel took 0.35 ms of a 7.7 ms half-step,
    and a gather kernel 0.39 ms that is most likely the index_select (`prof_beam.json` of
    loadtest/results/u1-beam-s1inf-h200-2026-12-03-718ceba; n=4's step has neither): ~10x the copies'
    bytes at copy bandwidth. Not re-measured as words yet."""
    raw = cache.view(torch.uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        if raw.shape[-1] % dtype.itemsize == 0 and raw.storage_offset() % dtype.itemsize == 0:
            return raw.view(dtype)
    return raw
