"""The KV cache manager under a sliding window (engine/core/sliding_window.py): which blocks it
releases and when, window-aware prefix hits, forks, failure cleanup, and the admission and context
bounds a window gives; which models get a window at all. No model is built."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import EngineConfig
from engine.core.block_pool import NULL_BLOCK
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.core.sliding_window import first_live_block, longest_window_hit, max_blocks_held
from engine.errors import InvalidRequestError
from engine.inputs.input_processor import InputProcessor
from engine.model_config import ModelConfig
from tests.engine.test_sliding_window_config import BASE as WINDOW_CONFIG_BASE

BS, W = 4, 6  # a query at p reads p - 5 .. p: two blocks, or three where p - 5 is not block-aligned


def _req(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, list(tokens), SamplingParams())


def _decode(kv: KVCacheManager, req: Request, token: int) -> None:
    """One decode as the scheduler runs it: allocate for the position, then advance."""
    req.append_output_token(token)
    assert kv.allocate_slots(req, 1) is not None
    req.num_computed_tokens += 1


def _live(kv: KVCacheManager, req_id: str) -> list[bool]:
    return [b is not NULL_BLOCK for b in kv.req_to_blocks[req_id]]


def test_first_live_block_follows_the_window() -> None:
    # position 9 reads 4 .. 9: blocks 1 and 2; position 10 reads 5 .. 10, still from block 1
    assert [first_live_block(c, W, BS) for c in (0, 5, 8, 9, 10, 12, 13)] == [0, 0, 0, 1, 1, 1, 2]


def test_blocks_behind_the_window_go_back_as_the_sequence_decodes() -> None:
    kv = KVCacheManager(16, BS, True, sliding_window=W)
    req = _req("a", list(range(10)))
    assert kv.allocate_slots(req, 10) is not None  # the prompt's chunk starts at 0: nothing released
    req.num_computed_tokens = 10
    assert _live(kv, "a") == [True] * 3 and kv.num_free_blocks == 13
    _decode(kv, req, 100)  # position 10 reads 5 .. 10: block 0 is dead
    assert _live(kv, "a") == [False, True, True] and kv.num_free_blocks == 14
    assert kv.get_block_ids("a")[0] == NULL_BLOCK.block_id
    for t in range(101, 104):  # positions 11 .. 13: block 3 is taken at 12, block 1 released at 13
        _decode(kv, req, t)
    assert _live(kv, "a") == [False, False, True, True] and kv.num_free_blocks == 14
    # The released blocks keep their hashes: free, yet a later request may still hit them.
    assert kv.block_pool.get_cached_block(req.block_hashes[0]) is not None
    kv.free(req)
    assert kv.num_free_blocks == 16


def test_a_prompt_chunk_keeps_the_window_of_its_first_query() -> None:
    kv = KVCacheManager(16, BS, False, sliding_window=W)
    req = _req("a", list(range(30)))
    for start in (0, 7, 14):  # chunks of 7: the chunk at 14 reads back to 9, in block 2
        req.num_computed_tokens = start
        assert kv.allocate_slots(req, 7) is not None
    assert _live(kv, "a") == [False, False, True, True, True, True]


def test_prefix_hit_needs_only_the_blocks_of_its_first_querys_window() -> None:
    kv = KVCacheManager(16, BS, True, sliding_window=W)
    a = _req("a", list(range(22)))
    assert kv.allocate_slots(a, 22) is not None
    a.num_computed_tokens = 22
    kv.free(a)
    hashes = a.block_hashes
    # Blocks 0 and 1 evicted; the hit of 20 tokens needs 15 .. 19: blocks 3 and 4 only.
    for h in hashes[:2]:
        kv.block_pool.uncache_blocks((kv.block_pool.get_cached_block(h),))
    b = _req("b", list(range(22)))
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 20 and hits[:3] == [NULL_BLOCK] * 3
    assert hits[3:] == [kv.block_pool.get_cached_block(h) for h in hashes[3:5]]
    assert kv.allocate_slots(b, 2, hits) is not None
    assert kv.num_free_blocks == 16 - 3  # the two hits and the block for tokens 20, 21
    # Block 4 evicted too: the longest usable hit now ends before it, at 16 tokens (needs 11 .. 15).
    kv.free(b)
    pool = kv.block_pool
    pool.uncache_blocks((pool.get_cached_block(hashes[4]),))
    hits, num_hit = kv.get_computed_blocks(_req("c", list(range(22))))
    assert num_hit == 16
    assert hits == [
        NULL_BLOCK,
        NULL_BLOCK,
        pool.get_cached_block(hashes[2]),
        pool.get_cached_block(hashes[3]),
    ]


def test_longest_window_hit_looks_each_block_up_once() -> None:
    looked: list[int] = []
    cached = {0, 1, 2, 4, 5, 6, 7}  # block 3 missing

    def lookup(i: int) -> int | None:
        looked.append(i)
        return i if i in cached else None

    # 8 blocks of 4, window 6: a hit of 8 blocks needs blocks 6, 7; found at once
    assert longest_window_hit(lookup, 8, 6, 4) == (6, [6, 7])
    looked.clear()
    # window 14: a hit of 8 blocks needs 4 .. 7 (found); of 7 would need 3 .. 6
    assert longest_window_hit(lookup, 8, 14, 4) == (4, [4, 5, 6, 7])
    looked.clear()
    # window 20: 8 blocks need 3 .. 7, 3 is missing; 3 blocks need 0 .. 2
    assert longest_window_hit(lookup, 8, 20, 4) == (0, [0, 1, 2])
    assert sorted(looked) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_a_fork_needs_the_parent_to_hold_the_childs_window() -> None:
    kv = KVCacheManager(16, BS, True, sliding_window=W)
    parent = _req("p", list(range(10)))
    assert kv.allocate_slots(parent, 10) is not None
    parent.num_computed_tokens = 10
    assert kv.can_fork(parent, 9)  # a child computing position 9 reads 4 .. 9: blocks 1, 2, held
    child = _req("c", list(range(10)))
    kv.fork(child, parent, 9)
    child.num_computed_tokens = 9
    assert kv.allocate_slots(child, 1) is not None  # copy-on-write of the shared block 2
    assert _live(kv, "c") == [False, True, True]  # released its reference to block 0 at position 9
    assert kv.req_to_blocks["c"][1] is kv.req_to_blocks["p"][1]
    for t in range(100, 104):
        _decode(kv, parent, t)  # the parent moves on to position 13: blocks 0, 1 released
    assert not kv.can_fork(parent, 9)
    assert kv.req_to_blocks["c"][1].ref_cnt == 1  # the child's reference keeps it
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 16


def test_free_after_a_failed_step_uncaches_the_released_blocks_too() -> None:
    kv = KVCacheManager(16, BS, True, sliding_window=W)
    req = _req("a", list(range(16)))
    req.num_computed_tokens = 0
    assert kv.allocate_slots(req, 8) is not None
    req.num_computed_tokens = 8
    assert kv.allocate_slots(req, 8) is not None  # chunk at 8 reads from 3: nothing released yet
    req.num_computed_tokens = 16
    req.append_output_token(1)
    assert kv.allocate_slots(req, 1) is not None  # position 16 reads from 11: blocks 0, 1 released
    assert _live(kv, "a") == [False, False, True, True, True]
    kv.free(req, uncache=True)  # the step that filled blocks 0-3 failed: none of them may be hit
    assert all(kv.block_pool.get_cached_block(h) is None for h in req.block_hashes)
    assert kv.num_free_blocks == 16


def test_max_blocks_held_bounds_a_windowed_sequence_by_window_and_chunk() -> None:
    assert max_blocks_held(1000, 16, None, 512) == 63
    assert max_blocks_held(1000, 16, 100, 512) == 40  # cdiv(99 + 512, 16) + 1
    assert max_blocks_held(40, 16, 100, 512) == 3  # never more than its tokens' blocks
    assert max_blocks_held(1000, 8, 10, 1) == 3  # a decode: keys c - 9 .. c span 3 blocks at most


def test_admission_and_the_context_bound_count_the_window() -> None:
    """A windowed model's request may be longer than the whole cache; a chunk that could not fit is
    still refused, and a beam search counts every beam whole (a device-ranked group keeps its blocks)."""
    window = InputProcessor(None, 1000, 4096, 16, 40, [2], sliding_window=100, max_chunk_tokens=256)
    assert window.process("a", [5] * 100, SamplingParams(max_tokens=3000)).sampling_params.max_tokens == 3000
    chunky = InputProcessor(None, 1000, 4096, 16, 20, [2], sliding_window=100, max_chunk_tokens=512)
    with pytest.raises(
        InvalidRequestError, match="needs 40 KV cache blocks of 16 tokens, but the KV cache has only 20"
    ):
        chunky.process("b", [5] * 100, SamplingParams(max_tokens=3000))
    config = EngineConfig(model="/m", device="cpu", block_size=16, max_num_batched_tokens=256)
    windowed = config.resolve_with(_model("MistralForCausalLM", sliding_window=100))
    assert windowed.cache.sliding_window == 100
    assert windowed.with_num_kv_blocks(40).scheduler.max_model_len == 8192  # cdiv(355, 16) + 1 = 24 fit
    assert windowed.with_num_kv_blocks(20).scheduler.max_model_len == 320  # they don't: the cache's size
    full = config.resolve_with(_model("MistralForCausalLM", sliding_window=None))
    assert full.cache.sliding_window is None
    assert full.with_num_kv_blocks(40).scheduler.max_model_len == 640


_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48}


def _model(arch: str, **cfg: Any) -> ModelConfig:
    base = {**WINDOW_CONFIG_BASE, "num_hidden_layers": 4}
    return ModelConfig.from_dicts("/m", {**base, "architectures": [arch], **cfg}, device="cpu")


@pytest.mark.parametrize(
    ("arch", "cfg", "window"),
    [
        ("MistralForCausalLM", {"sliding_window": 4096}, 4096),
        ("Phi3ForCausalLM", {"sliding_window": 2047}, 2047),
        (
            "Qwen2ForCausalLM",
            {"use_sliding_window": True, "sliding_window": 512, "max_window_layers": 0},
            512,
        ),
        (
            "Qwen3MoeForCausalLM",
            {"use_sliding_window": True, "sliding_window": 512, **_MOE},
            512,
        ),
        # a layer reading its whole context keeps every block: one table serves every layer
        (
            "Qwen2ForCausalLM",
            {"use_sliding_window": True, "sliding_window": 512, "max_window_layers": 1},
            None,
        ),
        ("Gemma2ForCausalLM", {"sliding_window": 512, "head_dim": 16}, None),
        ("MistralForCausalLM", {"sliding_window": 8192}, None),  # holds max_model_len: no window at all
        ("MistralForCausalLM", {"sliding_window": None}, None),
    ],
)
def test_only_models_windowed_on_every_layer_release_blocks(arch: str, cfg: dict, window: int | None) -> None:
    assert _model(arch, **cfg).uniform_sliding_window == window
