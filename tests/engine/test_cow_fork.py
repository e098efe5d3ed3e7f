"""Parallel sampling shares the prompt's KV blocks copy-on-write: one prefill, then the children fork."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import LLM, SamplingParams
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import Request
from engine.worker.block_copy import as_words, copy_kv_blocks, copy_kv_rows

PROMPT = list(range(5, 26))  # 21 tokens: 2 full blocks of 8 and a partial one
SAMPLE = {"temperature": 1.0, "seed": 7, "max_tokens": 6, "ignore_eos": True}


def _req(req_id: str, n: int) -> Request:
    return Request(req_id, list(range(n)), SamplingParams(max_tokens=4))


def test_fork_shares_blocks_and_copies_the_partial_one_on_first_write() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    parent, child = _req("p", 10), _req("c", 10)
    assert kv.allocate_slots(parent, 10) is not None
    parent.num_computed_tokens = 10
    kv.fork(child, parent, 9)  # the child computes the last prompt token itself
    child.num_computed_tokens = 9
    shared = kv.req_to_blocks["p"]
    assert [b.ref_cnt for b in shared] == [2, 2, 2]
    assert kv.allocate_slots(child, 1) == []
    copied = kv.req_to_blocks["c"]
    assert copied[:2] == shared[:2] and copied[2] is not shared[2]
    assert [b.ref_cnt for b in shared] == [2, 2, 1] and copied[2].ref_cnt == 1
    assert kv.replaced == {"c": (2, copied[2].block_id)}
    assert kv.take_copies() == [(shared[2].block_id, copied[2].block_id)]
    assert kv.take_copies() == [] and kv.replaced == {}
    # The parent's next write finds its block unshared now: no copy.
    assert kv.allocate_slots(parent, 1) == []
    assert kv.take_copies() == []
    kv.free(child)
    kv.free(parent)
    assert kv.num_free_blocks == 16


def test_copy_kv_blocks_reads_every_source_before_writing() -> None:
    k = torch.arange(4.0).view(4, 1, 1, 1).repeat(1, 2, 1, 3)  # [blocks, block_size, heads, dim]
    v = -k.clone()
    copy_kv_blocks([(k, v)], [(0, 1), (1, 2)])  # block 1 is a destination and a source
    assert k[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 3.0]
    assert v[:, 0, 0, 0].tolist() == [0.0, 0.0, -1.0, -3.0]


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_copies_over_stacked_caches_are_one_gather_and_one_scatter_for_every_layer() -> None:
    """The runner's caches are views of one [num_layers, 2, num_blocks, ...] tensor: a step's block
    copies are then two launches in all, not two per layer's K and per layer's V, with the same result
    (sources read before any destination is written)."""
    stack = torch.randn(5, 2, 6, 4, 2, 3)  # [layers, K/V, blocks, block_size, heads, dim]
    caches = [(stack[i, 0], stack[i, 1]) for i in range(5)]
    original = stack.clone()
    expected = [(k.clone(), v.clone()) for k, v in caches]
    copies = [(0, 1), (1, 2), (4, 5)]
    copy_kv_blocks(expected, copies)
    with _CountOps() as counted:
        copy_kv_blocks(caches, copies, stack)
    moves = [op for op in counted.ops if op in ("index_select", "index_copy_", "index_copy")]
    assert moves == ["index_select", "index_copy_"]
    for (k, v), (ek, ev) in zip(caches, expected, strict=True):
        assert torch.equal(k, ek) and torch.equal(v, ev)
    # Block 2 holds block 1's KV from before the copies (block 1 itself was overwritten by block 0's).
    assert torch.equal(caches[2][1][2], original[2, 1, 1]) and not torch.equal(stack, original)


def test_token_slot_copies_over_stacked_and_separate_caches_agree() -> None:
    """copy_kv_rows with token slots (the device-ranked beams' tail copies): slot s of block b is row
    b * block_size + s; the stacked path and the per-layer path give the same caches, each destination
    slot holding its source's KV from before the copy."""
    stack = torch.randn(3, 2, 5, 4, 2, 3)  # [layers, K/V, blocks, block_size, heads, dim]
    separate = [(stack[i, 0].clone(), stack[i, 1].clone()) for i in range(3)]
    original = stack.clone()
    src = torch.tensor([0, 1, 2, 5, 6])  # block 0's slots 0-2, block 1's slots 1-2
    dst = torch.tensor([9, 10, 11, 1, 17])  # block 2's slots 1-3, then slot 1 (also a source), block 4's 1
    copy_kv_rows([(stack[i, 0], stack[i, 1]) for i in range(3)], stack, src, dst, token_slots=True)
    copy_kv_rows(separate, None, src, dst, token_slots=True)
    flat = original.flatten(2, 3)  # [layers, K/V, blocks * block_size, heads, dim]
    want = flat.clone()
    want[:, :, dst] = flat[:, :, src]
    assert torch.equal(stack.flatten(2, 3), want)
    for i, (k, v) in enumerate(separate):
        assert torch.equal(k.flatten(0, 1), want[i, 0]) and torch.equal(v.flatten(0, 1), want[i, 1])


def test_the_runner_caches_are_views_of_one_stack(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", num_kv_blocks=8)
    runner = llm.llm_engine.executor.runner  # type: ignore[attr-defined]
    stack = runner.kv_cache_stack
    assert stack is not None and stack.shape[:3] == (len(runner.kv_caches), 2, 8)
    for i, (k, v) in enumerate(runner.kv_caches):
        assert k.data_ptr() == stack[i, 0].data_ptr() and v.data_ptr() == stack[i, 1].data_ptr()
        assert k.is_contiguous() and v.is_contiguous() and k.shape == stack.shape[2:]


def _run_counting_blocks(llm: LLM, params: SamplingParams) -> tuple[list[list[int]], int]:
    """Generate one request step by step; its children's tokens and the most blocks in use at once."""
    engine = llm.llm_engine
    engine.add_request("r", PROMPT, params)
    kv = engine.scheduler.kv_cache_manager
    peak = 0
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
        peak = max(peak, kv.num_blocks - kv.num_free_blocks)
    assert final is not None
    assert kv.num_free_blocks == kv.num_blocks
    return [c.token_ids for c in final.outputs], peak


@pytest.fixture(scope="module")
def roomy(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=8, num_kv_blocks=32)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_n4_uses_the_prompt_once_plus_each_child(
    roomy: LLM, tiny_llama_dir: Path, prefix_caching: bool
) -> None:
    llm = roomy
    if not prefix_caching:
        llm = LLM(
            str(tiny_llama_dir),
            device="cpu",
            dtype="float32",
            block_size=8,
            num_kv_blocks=32,
            enable_prefix_caching=False,
        )
    tokens, peak = _run_counting_blocks(llm, SamplingParams(n=4, **SAMPLE))
    # 27 tokens per child: the 2 full prompt blocks once, then per child its copy of the partial
    # third block and its own fourth (without sharing: 4 x 4 = 16).
    assert peak == 2 + 4 * 2
    # Each child is the sample a lone request with its seed draws: the forked KV is the prompt's.
    for i, child in enumerate(tokens):
        (alone,) = llm.generate([PROMPT], SamplingParams(**{**SAMPLE, "seed": 7 + i}), use_tqdm=False)
        assert child == alone.outputs[0].token_ids


def test_n4_under_preemption_gives_the_same_samples(roomy: LLM, tiny_llama_dir: Path) -> None:
    """A cache too small for the four children at once: some are preempted and recompute (forking a
    running sibling's prompt again); the samples do not change and every block comes back."""
    params = SamplingParams(n=4, **{**SAMPLE, "max_tokens": 12})
    expected, _ = _run_counting_blocks(roomy, params)
    tight = LLM(
        str(tiny_llama_dir),
        device="cpu",
        dtype="float32",
        block_size=8,
        num_kv_blocks=9,
        admission_reserve_tokens=0,
    )
    got, peak = _run_counting_blocks(tight, params)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert got == expected
    assert peak <= 9
    # Every preempted or finished sequence gave its block-table row back, zeroed (the runner hears of the
    # last step's finished ones with the next step: those still hold theirs).
    runner = tight.llm_engine.executor.runner  # type: ignore[attr-defined]
    held = {s.table_row for s in runner.requests.values()} - {-1}
    assert len(runner.block_rows) == len(held) <= 4
    assert not np.delete(runner.block_rows.table, sorted(held), axis=0).any()
    tight.shutdown()


def test_block_copies_move_the_widest_words_that_divide_a_row() -> None:
    """Copies move integer words, not bytes (each index-kernel thread then moves 8 bytes): int64 for a
    bf16 row of 128, int32 for a float32 row of 3 (12 bytes), bytes for an fp8 row of 3; every dtype's
    KV comes through bit for bit."""
    cases = [
        (torch.bfloat16, 128, torch.int64),
        (torch.float32, 3, torch.int32),
        (torch.float8_e4m3fn, 3, torch.uint8),
        (torch.float8_e4m3fn, 16, torch.int64),
    ]
    for dtype, dim, word in cases:
        stack = torch.randn(2, 2, 5, 4, 2, dim).to(dtype)  # [layers, K/V, blocks, block_size, heads, dim]
        assert as_words(stack).dtype == word
        caches = [(stack[i, 0], stack[i, 1]) for i in range(2)]
        before = stack.view(torch.uint8).clone()
        copy_kv_blocks(caches, [(0, 3), (4, 1)], stack)
        after = stack.view(torch.uint8)
        assert torch.equal(after[:, :, 3], before[:, :, 0]) and torch.equal(after[:, :, 1], before[:, :, 4])
        assert torch.equal(after[:, :, [0, 2, 4]], before[:, :, [0, 2, 4]])
    # A view whose first byte is not word-aligned stays bytes (a wider view would be refused).
    odd = torch.zeros(17, dtype=torch.uint8)[1:].view(2, 8)
    assert as_words(odd).dtype == torch.uint8
