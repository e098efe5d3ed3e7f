"""Physical KV cache blocks and the pool that hands them out. Plain Python, no torch.

Every operation is O(1) per block: free blocks sit in an intrusive doubly-linked list (the links
live in the blocks themselves), so taking a cached block out of the middle of the list for a prefix
hit costs the same as popping the head.

A free block may still carry a hash: its KV is valid and a later request with the same prefix can
reuse it (`touch`). Such blocks are evicted in LRU order: freed blocks join the tail, allocation
pops the head, and a popped block loses its hash.

`NULL_BLOCK` stands in a block table for a block a sliding window released (engine/core/sliding_window.py):
not one of the pool's blocks, never cached, never written; `touch` and `free_blocks` pass over it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    # Chained hash of the tokens this block holds, set once the block is full and registered in
    # the prefix cache; None for partial or uncached blocks.
    block_hash: bytes | None = None
    # Free-list links; both None while the block is in use.
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={h})"


# Its id keeps a table row's entries valid block indices, though no kernel reads the entry: a table
# position holding it is before every window that sequence's queries will read.
NULL_BLOCK = KVCacheBlock(0)


class FreeBlockQueue:
    """Doubly-linked list of free blocks between two sentinels; head = next to evict."""

    __slots__ = ("_head", "_tail", "num_free_blocks")

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free list")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer; got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        # Prefix cache: hash -> the block holding that KV. A block is here whether in use or free.
        self.cached_block_hash_to_block: dict[bytes, KVCacheBlock] = {}

    # ---------------------------------------------------------------- counters
    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_block_hash_to_block)

    # ---------------------------------------------------------------- allocation
    def allocate(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` from the head of the free list (evicting their cached KV), ref_cnt 1."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {self.num_free_blocks} are free")
        out = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-hit blocks, pulling free ones out of the free list."""
        for block in blocks:
            if block is NULL_BLOCK:
                continue
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference on each block; blocks reaching 0 join the free-list tail in this order,
        so the first one given is the first to be evicted."""
        for block in blocks:
            if block is NULL_BLOCK:
                continue
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    # ---------------------------------------------------------------- prefix cache
    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_block(self, block: KVCacheBlock, block_hash: bytes) -> bool:
        """Register a full block under its hash. Returns False (and leaves the block uncached) when
        caching is off or another block already holds the same KV."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.cached_block_hash_to_block:
            return False
        block.block_hash = block_hash
        self.cached_block_hash_to_block[block_hash] = block
        return True

    def uncache_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take blocks out of the prefix cache (their KV can't be trusted); they stay allocated."""
        for block in blocks:
            self._evict(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Blocks in use keep their KV; they just can't be hit any more."""
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True

    def _evict(self, block: KVCacheBlock) -> None:
        h = block.block_hash
        if h is None:
            return
        if self.cached_block_hash_to_block.get(h) is block:
            del self.cached_block_hash_to_block[h]
        block.block_hash = None
