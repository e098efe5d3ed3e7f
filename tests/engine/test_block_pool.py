"""Block pool: O(1) free list, reference counts, LRU eviction of cached blocks."""

from __future__ import annotations

import time

import pytest

from engine.core.block_pool import BlockPool


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_block_queue]


def test_allocate_and_free_update_counters_and_refcounts() -> None:
    pool = BlockPool(8, enable_caching=True)
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]  # block 0 is usable, not reserved
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 5
    assert pool.usage == pytest.approx(3 / 8)
    pool.free_blocks(blocks)
    assert all(b.ref_cnt == 0 for b in blocks)
    assert pool.num_free_blocks == 8 and pool.usage == 0.0


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(ValueError, match="cannot allocate 2 blocks: only 1 are free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_double_free_raises() -> None:
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.free_blocks([b])
    with pytest.raises(ValueError, match="double free of block 0"):
        pool.free_blocks([b])


def test_freed_blocks_join_the_tail_and_allocation_pops_the_head() -> None:
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    pool.free_blocks([c, a])
    pool.free_blocks([d])
    assert free_ids(pool) == [2, 0, 3]
    assert [x.block_id for x in pool.allocate(2)] == [2, 0]


def test_lru_eviction_drops_the_hash_of_the_reused_block_only() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, blk in enumerate(blocks):
        assert pool.cache_block(blk, bytes([i]) * 32)
    pool.free_blocks(blocks)  # all free, all still cached
    assert pool.num_cached_blocks == 3
    assert pool.get_cached_block(bytes([1]) * 32) is blocks[1]
    [reused] = pool.allocate(1)
    assert reused is blocks[0]  # least recently freed goes first
    assert reused.block_hash is None
    assert pool.get_cached_block(bytes([0]) * 32) is None
    assert pool.get_cached_block(bytes([1]) * 32) is blocks[1]
    assert pool.num_cached_blocks == 2


def test_touch_takes_a_cached_free_block_out_of_the_middle_of_the_free_list() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.cache_block(blocks[2], b"h" * 32)
    pool.free_blocks(blocks)
    pool.touch([blocks[2]])
    assert blocks[2].ref_cnt == 1
    assert free_ids(pool) == [0, 1, 3]
    assert pool.num_free_blocks == 3
    # A second request sharing it: refcount 2, freed only when both let go.
    pool.touch([blocks[2]])
    assert blocks[2].ref_cnt == 2
    pool.free_blocks([blocks[2]])
    assert pool.num_free_blocks == 3
    pool.free_blocks([blocks[2]])
    assert free_ids(pool) == [0, 1, 3, 2]  # most recently used: evicted last
    assert blocks[2].block_hash == b"h" * 32


def test_a_hash_is_held_by_one_block_only() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, b"x" * 32)
    assert not pool.cache_block(b, b"x" * 32)
    assert b.block_hash is None
    assert pool.get_cached_block(b"x" * 32) is a


def test_caching_disabled_registers_nothing() -> None:
    pool = BlockPool(2, enable_caching=False)
    [a] = pool.allocate(1)
    assert not pool.cache_block(a, b"x" * 32)
    assert pool.get_cached_block(b"x" * 32) is None


def test_reset_prefix_cache_forgets_every_hash() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, blk in enumerate(blocks):
        pool.cache_block(blk, bytes([i]) * 32)
    pool.free_blocks(blocks[:2])
    assert pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0
    assert all(b.block_hash is None for b in blocks)
    assert pool.num_free_blocks == 2 and blocks[2].ref_cnt == 1


def _touch_free_cycle_seconds(num_blocks: int, iters: int = 20_000) -> float:
    pool = BlockPool(num_blocks)
    blocks = pool.allocate(num_blocks)
    mid = blocks[num_blocks // 2]
    pool.cache_block(mid, b"m" * 32)
    pool.free_blocks(blocks)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            pool.touch([mid])  # removes it from the middle of the free list
            pool.free_blocks([mid])
            pool.free_blocks(pool.allocate(1))
        best = min(best, time.perf_counter() - t0)
    return best


def test_pool_operations_do_not_scale_with_pool_size() -> None:
    small = _touch_free_cycle_seconds(100)
    large = _touch_free_cycle_seconds(100_000)
    # A list-based free list would be ~1000x slower on the large pool.
    assert large < 5 * small + 0.05


def test_uncache_blocks_keeps_them_allocated() -> None:
    pool = BlockPool(2)
    [a] = pool.allocate(1)
    pool.cache_block(a, b"u" * 32)
    pool.uncache_blocks([a])
    assert a.block_hash is None and a.ref_cnt == 1 and pool.get_cached_block(b"u" * 32) is None
