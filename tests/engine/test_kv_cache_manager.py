"""KV cache manager: block tables, chained block hashes, automatic prefix caching."""

from __future__ import annotations

import hashlib
from array import array

import pytest

from engine.core.kv_cache_manager import KVCacheManager, hash_block_tokens
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.lora.request import LoRARequest

BS = 4


def make_req(req_id: str, tokens: list[int], salt: str | None = None, **sp: object) -> Request:
    return Request(req_id, list(tokens), SamplingParams(**sp), cache_salt=salt)  # type: ignore[arg-type]


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None) -> list[int] | None:
    """What the scheduler does for a waiting request: look up hits, allocate, advance."""
    hits, num_hit = kv.get_computed_blocks(req)
    n = req.num_tokens - num_hit if num_new is None else num_new
    ids = kv.allocate_slots(req, n, hits)
    if ids is not None:
        req.num_computed_tokens = num_hit + n
    return ids


def test_block_hash_is_chained_sha256_of_int64_tokens_and_salt() -> None:
    root = hashlib.sha256(b"weir prefix cache root").digest()
    h0 = hash_block_tokens(None, [1, 2, 3, 4], None)
    assert h0 == hashlib.sha256(root + array("q", [1, 2, 3, 4]).tobytes()).digest()
    h1 = hash_block_tokens(h0, [5, 6, 7, 8], "tenant")
    assert h1 == hashlib.sha256(h0 + array("q", [5, 6, 7, 8]).tobytes() + b"\x01tenant").digest()
    # The parent and the salt both matter.
    assert hash_block_tokens(None, [5, 6, 7, 8], "tenant") != h1
    assert hash_block_tokens(h0, [5, 6, 7, 8], None) != h1
    assert hash_block_tokens(h0, [5, 6, 7, 8], "") != hash_block_tokens(h0, [5, 6, 7, 8], None)


def test_block_hashes_cover_full_blocks_and_are_extended_incrementally() -> None:
    kv = KVCacheManager(16, BS, True)
    req = make_req("a", list(range(10)))
    kv.update_block_hashes(req)
    assert len(req.block_hashes) == 2  # the partial third block has no hash
    first = list(req.block_hashes)
    for t in (10, 11):
        req.append_output_token(t)
    kv.update_block_hashes(req)
    assert len(req.block_hashes) == 3
    assert req.block_hashes[:2] == first
    assert req.block_hashes[2] == hash_block_tokens(first[1], [8, 9, 10, 11], None)


@pytest.mark.parametrize("salt", [None, "", "tenant \u00e9"])
@pytest.mark.parametrize("lora_int_id", [0, 3])
def test_block_hashes_are_the_chained_spec_with_salt_and_adapter(salt: str | None, lora_int_id: int) -> None:
    """update_block_hashes (packed once, sliced per block) gives hash_block_tokens' chain exactly, over
    several extensions, with a cache salt and an adapter id."""
    kv = KVCacheManager(64, BS, True)
    lora = LoRARequest("a", lora_int_id, "/nowhere") if lora_int_id else None
    tokens = list(range(100, 123))
    req = Request("r", tokens, SamplingParams(), cache_salt=salt, lora_request=lora)  # type: ignore[arg-type]
    kv.update_block_hashes(req)
    for t in range(9):
        req.append_output_token(1000 + t)
        kv.update_block_hashes(req)
    all_ids = tokens + [1000 + t for t in range(9)]
    expected, parent = [], None
    for i in range(len(all_ids) // BS):
        parent = hash_block_tokens(parent, all_ids[i * BS : (i + 1) * BS], salt, lora_int_id)
        expected.append(parent)
    assert req.block_hashes == expected and len(expected) == 8


def test_allocate_returns_new_block_ids_and_grows_only_at_block_boundaries() -> None:
    kv = KVCacheManager(8, BS, True)
    req = make_req("a", list(range(6)))
    assert admit(kv, req) == [0, 1]
    assert kv.get_block_ids("a") == [0, 1]
    req.append_output_token(100)  # token 7 of 8: fits block 1
    assert kv.allocate_slots(req, 1) == []
    req.num_computed_tokens += 1
    req.append_output_token(101)
    assert kv.allocate_slots(req, 1) == []
    req.num_computed_tokens += 1
    req.append_output_token(102)  # token 9: needs a third block
    assert kv.allocate_slots(req, 1) == [2]
    assert kv.num_free_blocks == 5
    assert kv.usage == 3 / 8


def test_failed_allocation_leaves_nothing_behind() -> None:
    kv = KVCacheManager(3, BS, True)
    a = make_req("a", list(range(8)))
    assert admit(kv, a) is not None
    b = make_req("b", list(range(100, 109)))  # needs 3 blocks, 1 free
    assert admit(kv, b) is None
    assert kv.get_block_ids("b") == []
    assert kv.num_free_blocks == 1
    assert kv.prefix_cache_queries == 8  # the failed attempt is not counted


def test_prefix_hit_across_requests_shares_full_blocks_only() -> None:
    kv = KVCacheManager(16, BS, True)
    a = make_req("a", list(range(10)))  # blocks [0..3], [4..7] full; [8, 9] partial
    admit(kv, a)
    b = make_req("b", list(range(10)) + [50, 51, 52])
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    assert [blk.block_id for blk in hits] == kv.get_block_ids("a")[:2]
    ids = kv.allocate_slots(b, b.num_tokens - num_hit, hits)
    assert ids is not None
    table_a, table_b = kv.get_block_ids("a"), kv.get_block_ids("b")
    assert table_b[:2] == table_a[:2]
    assert table_b[2] != table_a[2]  # A's partial block is never shared
    assert [kv.block_pool.blocks[i].ref_cnt for i in table_b] == [2, 2, 1, 1]
    assert kv.prefix_cache_queries == 10 + 13
    assert kv.prefix_cache_hits == 8


def test_whole_prompt_hit_leaves_the_last_token_to_compute() -> None:
    kv = KVCacheManager(16, BS, True)
    a = make_req("a", list(range(8)))
    admit(kv, a)
    b = make_req("b", list(range(8)))
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 4 and len(hits) == 1  # the second block is recomputed for its logits
    c = make_req("c", list(range(9)))  # one token past the cached blocks: both blocks hit
    assert kv.get_computed_blocks(c)[1] == 8


def test_cache_salt_isolates_tenants() -> None:
    kv = KVCacheManager(16, BS, True)
    admit(kv, make_req("a", list(range(9)), salt="tenant-1"))
    assert kv.get_computed_blocks(make_req("b", list(range(9)), salt="tenant-2"))[1] == 0
    assert kv.get_computed_blocks(make_req("c", list(range(9))))[1] == 0
    assert kv.get_computed_blocks(make_req("d", list(range(9)), salt="tenant-1"))[1] == 8


def test_no_lookup_when_caching_is_off_or_prompt_logprobs_are_wanted() -> None:
    off = KVCacheManager(16, BS, False)
    admit(off, make_req("a", list(range(9))))
    assert off.get_computed_blocks(make_req("b", list(range(9))))[1] == 0
    assert off.prefix_cache_queries == 0
    on = KVCacheManager(16, BS, True)
    admit(on, make_req("a", list(range(9))))
    req = make_req("b", list(range(9)), prompt_logprobs=1)
    assert on.get_computed_blocks(req) == ([], 0)


def test_blocks_are_cached_as_soon_as_their_tokens_are_scheduled() -> None:
    kv = KVCacheManager(16, BS, True)
    a = make_req("a", list(range(12)))
    admit(kv, a, num_new=6)  # chunked prefill: first 6 tokens -> 1 full block
    assert kv.block_pool.num_cached_blocks == 1
    kv.allocate_slots(a, 6)
    a.num_computed_tokens = 12
    assert kv.block_pool.num_cached_blocks == 3
    # Decode tokens fill and cache blocks too.
    for t in range(3):
        a.append_output_token(100 + t)
        kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    assert kv.block_pool.num_cached_blocks == 3  # 15 of the 16 tokens are scheduled
    a.append_output_token(103)
    kv.allocate_slots(a, 1)
    assert kv.block_pool.num_cached_blocks == 4


def test_hits_on_freed_blocks_survive_until_evicted() -> None:
    kv = KVCacheManager(4, BS, True)
    a = make_req("a", list(range(10)))  # 3 blocks
    admit(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    # Same 2-block prefix + 6 more tokens: 2 hits (both free) + 2 new blocks = the whole pool.
    b = make_req("b", list(range(8)) + [60, 61, 62, 63, 64, 65])
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    assert kv.allocate_slots(b, b.num_tokens - num_hit, hits) is not None
    assert kv.num_free_blocks == 0
    kv.free(b)
    # One more token than fits: the touched hits can't double as fresh blocks.
    c = make_req("c", list(range(8)) + list(range(70, 79)))
    hits, num_hit = kv.get_computed_blocks(c)
    assert num_hit == 8
    assert kv.allocate_slots(c, c.num_tokens - num_hit, hits) is None
    assert all(blk.ref_cnt == 0 for blk in hits) and kv.num_free_blocks == 4


def test_free_releases_the_tail_first_so_it_is_evicted_first() -> None:
    kv = KVCacheManager(8, BS, True)
    a = make_req("a", list(range(13)))  # 4 blocks: 3 cached + 1 partial
    admit(kv, a)
    table = kv.get_block_ids("a")
    kv.free(a)
    assert [b.block_id for b in kv.block_pool.free_block_queue][-4:] == table[::-1]
    # Free list: 4 never-used blocks, then A's blocks 3, 2, 1, 0. Taking 7 evicts A's tail blocks
    # (3 was partial, 2 and 1 cached) and keeps its first block: that prefix still hits.
    other = make_req("g", list(range(600, 628)))
    admit(kv, other)
    assert kv.get_computed_blocks(make_req("b", list(range(13))))[1] == 4
    assert kv.block_pool.num_cached_blocks == 1 + 7  # A's first block + g's seven full blocks


def test_duplicate_full_block_stays_private_and_frees_cleanly() -> None:
    kv = KVCacheManager(8, BS, True)
    a = make_req("a", list(range(8)))
    admit(kv, a)
    b = make_req("b", list(range(8)))
    admit(kv, b)  # hits block 0, recomputes block 1 into a private copy
    assert kv.block_pool.num_cached_blocks == 2
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8
    assert all(blk.ref_cnt == 0 for blk in kv.block_pool.blocks)


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(8, BS, True)
    a = make_req("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_req("b", list(range(9))))[1] == 0


def test_free_with_uncache_drops_the_blocks_from_the_prefix_cache() -> None:
    kv = KVCacheManager(8, BS, True)
    a = make_req("a", list(range(9)))
    admit(kv, a)
    kv.free(a, uncache=True)
    assert kv.block_pool.num_cached_blocks == 0 and kv.num_free_blocks == 8
    assert kv.get_computed_blocks(make_req("b", list(range(9))))[1] == 0


def _pool_state(kv: KVCacheManager) -> tuple:
    pool = kv.block_pool
    refs = tuple(b.ref_cnt for b in pool.blocks)
    free = tuple(b.block_id for b in pool.free_block_queue)
    tables = {rid: [b.block_id for b in blocks] for rid, blocks in kv.req_to_blocks.items()}
    return refs, free, tables, dict(kv._num_cached_blocks)


def test_refork_leaves_the_pool_as_free_then_fork_does() -> None:
    """A beam taking a sibling's sequence: both share the prompt's blocks and then part ways. refork
    skips the shared run; references, the free list's order and the tables equal free + fork's."""
    states = []
    for one_pass in (False, True):
        kv = KVCacheManager(32, BS, True)
        prompt = list(range(1, 10))  # 9 tokens: 2 full blocks and a partial third
        parent, child = make_req("p", prompt), make_req("c", prompt)
        admit(kv, parent)
        kv.fork(child, parent, parent.num_computed_tokens)
        child.num_computed_tokens = parent.num_computed_tokens
        for req, tokens in ((parent, [20, 21, 22, 23, 24]), (child, [30, 31, 32, 33, 34, 35, 36])):
            for t in tokens:  # grow one token a step, copy-on-write on the first write
                req.append_output_token(t)
                assert kv.allocate_slots(req, 1) is not None
                req.num_computed_tokens += 1
            kv.take_copies()
        if one_pass:
            kv.refork(child, parent, parent.num_computed_tokens)
        else:
            kv.free(child)
            kv.fork(child, parent, parent.num_computed_tokens)
        states.append(_pool_state(kv))
    assert states[0] == states[1]
    refs, free, tables, _ = states[1]
    assert tables["c"] == tables["p"] and len(free) == 32 - len(tables["p"])
