"""Per-request block tables over the block pool, with automatic prefix caching. Plain Python, no torch.

Every FULL block of a request's tokens (prompt and outputs alike) gets a chained hash
    hash_i = sha256(hash_{i-1} + int64 token ids of block i + extra keys (LoRA adapter id, cache salt))
so a hash names the whole prefix up to the end of its block. A new request reuses the longest run
of its leading block hashes found in the pool; only full blocks are ever shared, so nobody writes
into a block someone else reads.

Sequences of one request (parallel sampling, beam search) share blocks by reference count instead:
`fork` gives a child its parent's blocks, and the first write into a shared, partially filled block
copies it first (copy-on-write): allocate_slots swaps in a fresh block and queues the copy
(`take_copies`), which the runner performs on the KV caches before the step's forward pass.

A block is registered in the cache as soon as the tokens that fill it are scheduled (before the
forward pass has run): a request scheduled later in the same step may hit it, which is sound because
the runner writes a layer's KV for the whole batch before any attention of that layer reads it.

With `sliding_window` (every layer windowed alike: engine/core/sliding_window.py) a table holds only
what its queries can still read: each allocation first releases the blocks wholly before the window
of the request's next query, leaving `NULL_BLOCK` in their places (a table stays positional: block i
holds tokens i * block_size ..), and a prefix hit needs only the blocks its first computed query's
window reaches. A released block keeps its hash: it waits in the free list as any freed cached
block, and a later request may hit it. That is sound under async scheduling too: the step in flight
may still read a block released while the next step is scheduled, but a block given to another
request is written only by a later step's forward pass, which runs after it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from engine.core.block_pool import NULL_BLOCK, BlockPool, KVCacheBlock
from engine.core.request import Request
from engine.core.sliding_window import first_live_block, longest_window_hit

# Parent of the first block: a fixed 32-byte value keeps every hash input the same layout.
_ROOT_HASH = hashlib.sha256(b"weir prefix cache root").digest()


def hash_block_tokens(
    parent_hash: bytes | None, token_ids: Sequence[int], extra_key: str | None, lora_int_id: int = 0
) -> bytes:
    """Chained hash of one full block. `extra_key` (cache salt) and `lora_int_id` (the adapter whose
    weights computed the KV; 0: the base model) isolate tenants."""
    packed = array("q", token_ids).tobytes()
    return chain_block_hashes(parent_hash, packed, len(packed), _hash_suffix(extra_key, lora_int_id))[0]


def _hash_suffix(extra_key: str | None, lora_int_id: int) -> bytes:
    """What each block's hash takes after its tokens: the adapter id (fixed length, before the salt's
    variable-length text, so the layout stays unambiguous), then a marker byte and the salt."""
    lora = b"\x02" + lora_int_id.to_bytes(8, "little") if lora_int_id else b""
    return lora + (b"\x01" + extra_key.encode("utf-8") if extra_key is not None else b"")


def chain_block_hashes(parent_hash: bytes | None, packed: bytes, width: int, suffix: bytes) -> list[bytes]:
    """The chained hashes of consecutive blocks: `packed` is their int64 tokens, `width` bytes a block;
    each hash is sha256(parent + tokens + suffix). The tokens are packed once for every block (~2x
    faster a block than packing each: a long prompt's ~130 blocks are hashed when it is first
    scheduled)."""
    view = memoryview(packed)
    parent = parent_hash if parent_hash is not None else _ROOT_HASH
    sha256 = hashlib.sha256
    hashes = []
    for start in range(0, len(packed), width):
        h = sha256(parent)
        h.update(view[start : start + width])
        if suffix:
            h.update(suffix)
        parent = h.digest()
        hashes.append(parent)
    return hashes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        sliding_window: int | None = None,
    ) -> None:
        """`sliding_window`: the window of every attention layer of the model (CacheConfig's), whose
        blocks behind it are released; None where any layer reads its whole context."""
        if block_size <= 0:
            raise ValueError(f"block_size must be a positive integer; got {block_size}")
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive integer; got {sliding_window}")
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # req_id -> how many leading blocks of its table are already registered in the cache.
        self._num_cached_blocks: dict[str, int] = {}
        # req_id -> how many leading entries of its table are NULL_BLOCK (released behind its window).
        self._num_released: dict[str, int] = {}
        # Monotonic counters in tokens, for Prometheus. Counted once per admission (when the
        # lookup is committed by allocate_slots), not per lookup attempt of a blocked queue head.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Copy-on-write since the last take_copies(): (src, dst) block ids for the runner, and
        # req_id -> (index in its table, new block id) for the runner's copy of the table.
        self._copies: list[tuple[int, int]] = []
        self.replaced: dict[str, tuple[int, int]] = {}

    # ---------------------------------------------------------------- counters
    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    # ---------------------------------------------------------------- prefix lookup
    def _uses_prefix_cache(self, request: Request) -> bool:
        # Prompt logprobs need logits at every prompt position, so nothing may be skipped.
        return self.enable_prefix_caching and request.sampling_params.prompt_logprobs is None

    def update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to cover every full block of its tokens (incremental)."""
        hashes = request.block_hashes
        bs = self.block_size
        num_full = request.num_tokens // bs
        first = len(hashes)
        if first >= num_full:
            return
        packed = array("q", request.all_token_ids[first * bs : num_full * bs]).tobytes()
        suffix = _hash_suffix(request.cache_salt, request.lora_int_id)
        hashes.extend(chain_block_hashes(hashes[-1] if hashes else None, packed, bs * 8, suffix))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached run of the request's leading full blocks, and the tokens they hold (under a
        window: the longest prefix whose window blocks are cached, _window_hit).

        At least the last token is left to compute so the forward pass yields logits for it.
        """
        if not self._uses_prefix_cache(request):
            return [], 0
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        if self.sliding_window is not None:
            return self._window_hit(request.block_hashes, max_blocks)
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def _window_hit(self, block_hashes: list[bytes], max_blocks: int) -> tuple[list[KVCacheBlock], int]:
        """A windowed request's hit: the blocks its first computed query's window reaches must be
        cached, those before it need not be (NULL_BLOCK in the hit). Not the leading run: a long
        sequence's first blocks are the first evicted once released, while its window's stay."""
        window = self.sliding_window
        assert window is not None
        if window == 1:
            return [], 0  # a query reads only its own key: a "hit" would need no cached block at all
        lookup = self.block_pool.get_cached_block
        first, found = longest_window_hit(
            lambda i: lookup(block_hashes[i]), max_blocks, window, self.block_size
        )
        hits = [NULL_BLOCK] * first + found if found else []
        return hits, len(hits) * self.block_size

    def blocks_to_hold(self, req_id: str, num_tokens: int, hits: list[KVCacheBlock] | None = None) -> int:
        """Blocks the request's table would still take from the pool to hold `num_tokens` tokens, with
        the prefix hits `hits` about to join it (those in the free list are taken from the pool too).
        Under a window, at most what its live blocks can still grow to (cdiv(window, block_size) + 1):
        the blocks behind it go back."""
        hits = hits or []
        blocks = self.req_to_blocks.get(req_id)
        held = (len(blocks) if blocks is not None else 0) + len(hits)
        need = max(0, _cdiv(num_tokens, self.block_size) - held)
        if self.sliding_window is not None and need:
            released = self._num_released.get(req_id, 0) + sum(1 for b in hits if b is NULL_BLOCK)
            need = min(need, max(0, _cdiv(self.sliding_window, self.block_size) + 1 - (held - released)))
        return need + sum(1 for b in hits if b.ref_cnt == 0 and b is not NULL_BLOCK)

    # ---------------------------------------------------------------- allocation
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[int] | None:
        """Grow the request's table to hold its computed tokens, the prefix hits and `num_new_tokens`.

        Returns the ids of the blocks appended to its table (hits first), or None when the pool is
        short — in which case nothing changed but the release of blocks behind the window, which no
        query of the request reads either way.
        """
        req_id = request.req_id
        if not new_computed_blocks:
            # Fast path, most decode steps: the table already has room for the new tokens.
            blocks = self.req_to_blocks.get(req_id)
            if self.sliding_window is not None and blocks is not None:
                # Before the check below: the released blocks count as free for this allocation.
                self._release_behind_window(req_id, blocks, request.num_computed_tokens)
            total_tokens = request.num_computed_tokens + num_new_tokens
            if (
                blocks is not None
                and total_tokens <= len(blocks) * self.block_size
                and (
                    not num_new_tokens or blocks[request.num_computed_tokens // self.block_size].ref_cnt == 1
                )
            ):
                # _cache_full_blocks only once a block has filled up (every block_size-th decode).
                num_known = min(total_tokens, len(request.all_token_ids))
                if (
                    self.enable_prefix_caching
                    and num_known // self.block_size > self._num_cached_blocks[req_id]
                ):
                    self._cache_full_blocks(request, blocks, num_known)
                return []
        computed = new_computed_blocks or []
        is_new = req_id not in self.req_to_blocks
        blocks = self.req_to_blocks.get(req_id, [])
        num_computed_tokens = request.num_computed_tokens + len(computed) * self.block_size
        total_tokens = num_computed_tokens + num_new_tokens
        num_needed = max(0, _cdiv(total_tokens, self.block_size) - len(blocks) - len(computed))
        # The first block written into, if another sequence shares it (a fork): copied first.
        write_index = num_computed_tokens // self.block_size
        cow = num_new_tokens > 0 and write_index < len(blocks) and blocks[write_index].ref_cnt > 1
        # Hits sitting in the free list stop being allocatable once touched.
        num_evictable_hits = sum(1 for b in computed if b.ref_cnt == 0 and b is not NULL_BLOCK)
        if num_needed + cow > self.block_pool.num_free_blocks - num_evictable_hits:
            return None
        if cow:
            self._copy_on_write(req_id, blocks, write_index)

        if is_new:
            self.req_to_blocks[req_id] = blocks
            # Hits are registered already; the run of cached blocks starts after them.
            self._num_cached_blocks[req_id] = len(computed)
            # A windowed hit's leading nulls (_window_hit).
            self._num_released[req_id] = sum(1 for b in computed if b is NULL_BLOCK)
            if self._uses_prefix_cache(request):
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(computed) * self.block_size
        self.block_pool.touch(computed)
        blocks.extend(computed)
        new_blocks = self.block_pool.allocate(num_needed)
        blocks.extend(new_blocks)

        if self.enable_prefix_caching:
            self._cache_full_blocks(request, blocks, min(total_tokens, request.num_tokens))
        return [b.block_id for b in computed] + [b.block_id for b in new_blocks]

    def _release_behind_window(
        self, req_id: str, blocks: list[KVCacheBlock], num_computed_tokens: int
    ) -> None:
        """Give back the table's blocks that no query of the request, from position
        `num_computed_tokens` on, reads; NULL_BLOCK takes their places. A block other sequences hold
        (a fork, a prefix hit) only loses this reference; a cached one keeps its hash."""
        assert self.sliding_window is not None
        start = self._num_released[req_id]
        end = min(first_live_block(num_computed_tokens, self.sliding_window, self.block_size), len(blocks))
        if end <= start:
            return
        dead = blocks[start:end]
        blocks[start:end] = [NULL_BLOCK] * (end - start)
        self._num_released[req_id] = end
        self.block_pool.free_blocks(dead)  # oldest first: the first of them to be evicted

    def can_fork(self, parent: Request, num_tokens: int) -> bool:
        """Whether `parent`'s table still holds every block a sequence forked at `num_tokens` would
        read: under a window the parent may have released some once it ran past that point."""
        if self.sliding_window is None:
            return True
        needed_from = first_live_block(num_tokens, self.sliding_window, self.block_size)
        return self._num_released.get(parent.req_id, 0) <= needed_from

    def _copy_on_write(self, req_id: str, blocks: list[KVCacheBlock], index: int) -> None:
        shared = blocks[index]
        (copy,) = self.block_pool.allocate(1)
        blocks[index] = copy
        self.block_pool.free_blocks((shared,))  # the other sequences still hold it
        self._copies.append((shared.block_id, copy.block_id))
        self.replaced[req_id] = (index, copy.block_id)

    def fork(self, child: Request, parent: Request, num_tokens: int) -> None:
        """Give `child` (holding no blocks) the blocks of `parent`'s first num_tokens tokens, by
        reference. Whichever of them first writes into a shared block copies it (allocate_slots).
        Under a window the parent must still hold what the child reads (can_fork)."""
        if child.req_id in self.req_to_blocks:
            raise ValueError(f"request {child.req_id!r} already holds blocks")
        num_blocks = _cdiv(num_tokens, self.block_size)
        shared = self.req_to_blocks[parent.req_id][:num_blocks]
        self.block_pool.touch(shared)
        self.req_to_blocks[child.req_id] = shared
        self._num_cached_blocks[child.req_id] = min(
            self._num_cached_blocks[parent.req_id], num_tokens // self.block_size
        )
        self._num_released[child.req_id] = min(self._num_released[parent.req_id], num_blocks)

    def refork(self, child: Request, parent: Request, num_tokens: int) -> None:
        """free(child) then fork(child, parent, num_tokens), in one pass: the leading blocks the two
        tables share (a beam taking a sibling's sequence shares the prompt and most of its tokens)
        keep their references, since dropping and taking one back changes nothing (the parent holds
        them, so none reaches the free list); only the differing tails are freed and touched."""
        old = self.req_to_blocks.get(child.req_id)
        if not old or self.replaced.get(child.req_id) is not None:
            self.free(child)
            self.fork(child, parent, num_tokens)
            return
        num_blocks = _cdiv(num_tokens, self.block_size)
        new = self.req_to_blocks[parent.req_id][:num_blocks]
        same = 0
        for a, b in zip(old, new, strict=False):
            if a is not b:
                break
            same += 1
        self.block_pool.free_blocks(reversed(old[same:]))
        self.block_pool.touch(new[same:])
        self.req_to_blocks[child.req_id] = new
        self._num_cached_blocks[child.req_id] = min(
            self._num_cached_blocks[parent.req_id], num_tokens // self.block_size
        )
        self._num_released[child.req_id] = min(self._num_released[parent.req_id], num_blocks)

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies queued since the last call, for the step being scheduled."""
        copies, self._copies = self._copies, []
        self.replaced.clear()
        return copies

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        num_full = num_tokens // self.block_size
        start = self._num_cached_blocks[request.req_id]
        if num_full <= start:
            return
        self.update_block_hashes(request)
        hashes = request.block_hashes
        for i in range(start, num_full):
            block = blocks[i]
            if block is NULL_BLOCK:
                continue  # released before it was registered (a window narrower than the tokens in flight)
            # False when an identical block is cached already; this copy then stays private.
            self.block_pool.cache_block(block, hashes[i])
        self._num_cached_blocks[request.req_id] = num_full

    def free(self, request: Request, uncache: bool = False) -> None:
        """Release the request's blocks, tail first, so its last blocks are the first evicted.

        uncache=True also drops them from the prefix cache: after a failed forward pass the blocks
        registered at schedule time never received their KV. That includes the blocks a window
        released meanwhile (scheduled in the failed step, released when the next one was scheduled):
        whatever block is cached under the hashes of its released positions is dropped too.
        """
        blocks = self.req_to_blocks.pop(request.req_id, None)
        self._num_cached_blocks.pop(request.req_id, None)
        num_released = self._num_released.pop(request.req_id, 0)
        if self.replaced.pop(request.req_id, None) is not None and blocks:
            # Copied into this step, then preempted in the same step: the copy must not land in a
            # block that someone else may be given before the runner performs it.
            dropped = {b.block_id for b in blocks if b is not NULL_BLOCK}
            self._copies = [c for c in self._copies if c[1] not in dropped]
        if blocks:
            if uncache:
                self.block_pool.uncache_blocks(blocks)
                pool = self.block_pool
                for block_hash in request.block_hashes[:num_released]:
                    cached = pool.get_cached_block(block_hash)
                    if cached is not None:
                        pool.uncache_blocks((cached,))
            self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(req_id, ())]

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
