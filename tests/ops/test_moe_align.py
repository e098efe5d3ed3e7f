"""The one-launch alignment kernel (ops/triton/moe_align.py) against its spec, the torch ops of
ops.triton.fused_moe.moe_align_block_size, bit for bit in all three outputs (the padding slots, each
expert's pairs in increasing pair order, block_expert past the used length), under TRITON_INTERPRET=1
without a GPU (tests.ops.triton_interpreter). Chunks of 16 pairs where a case wants several chunks
cheaply; the default chunk elsewhere.
"""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import importlib

import pytest
import torch


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _routing(num_tokens: int, top_k: int, num_experts: int, seed: int, distinct: bool = True) -> torch.Tensor:
    """[num_tokens, top_k] int64: distinct experts per token (as topk picks them), or drawn with repeats."""
    gen = torch.Generator().manual_seed(seed)
    if distinct:
        ids = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices
    else:
        ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen)
    return ids.to(DEVICE)


def _assert_same(ids: torch.Tensor, num_experts: int, block_m: int, block: int | None = None) -> None:
    from ops.triton.fused_moe import moe_align_block_size
    from ops.triton.moe_align import moe_align_block_size_kernel

    expected = moe_align_block_size(ids, num_experts, block_m)
    got = moe_align_block_size_kernel(ids, num_experts, block_m, block)
    for name, e, g in zip(("sorted_pairs", "block_expert", "num_padded"), expected, got, strict=True):
        assert g.dtype == e.dtype == torch.int32 and g.shape == e.shape, name
        assert torch.equal(g, e), (name, ids.shape, num_experts, block_m, block, g.tolist(), e.tolist())


@in_process
@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m", "block"),
    [
        (1, 8, 128, 16, None),  # Qwen3-30B-A3B's decode step: 8 pairs of 128 experts
        (1, 1, 8, 16, None),  # a single pair
        (7, 2, 8, 16, 16),  # Mixtral's top 2; 14 pairs, one partial chunk
        (
            37,
            3,
            60,
            16,
            16,
        ),  # Qwen2-MoE's 60 experts (not a power of two); 111 pairs: 7 chunks, the last partial
        (70, 2, 6, 64, 16),  # 64-row blocks, several blocks of one expert; 140 pairs: 9 chunks
        (30, 4, 256, 64, None),  # 256 experts, most unused; block_expert past the used length
        (5, 5, 5, 16, None),  # top_k = num_experts: every token on every expert
    ],
)
def test_kernel_matches_the_torch_alignment(
    num_tokens: int, top_k: int, num_experts: int, block_m: int, block: int | None
) -> None:
    _assert_same(_routing(num_tokens, top_k, num_experts, seed=num_tokens), num_experts, block_m, block)


@in_process
@pytest.mark.parametrize("block_m", [16, 64])
def test_every_pair_on_one_expert(block_m: int) -> None:
    """Skewed routing: one expert's run spans several blocks and chunks; the others get no block, so the
    blocks past the used length all name the last expert."""
    ids = torch.full((45, 1), 3, dtype=torch.int64, device=DEVICE)  # 45 pairs: 3 chunks of 16
    _assert_same(ids, num_experts=7, block_m=block_m, block=16)
    ids = torch.full((20, 2), 0, dtype=torch.int64, device=DEVICE)  # expert 0, repeated within a token
    _assert_same(ids, num_experts=128, block_m=block_m, block=16)


@in_process
def test_every_expert_used_and_int32_ids() -> None:
    """Each of 20 experts gets pairs (the padded ends reach past the last block's start); int32 ids, as
    a caller may pass them, give the same result."""
    ids = (torch.arange(48, device=DEVICE) % 20).view(24, 2).flip(0)  # every expert, out of order
    _assert_same(ids, num_experts=20, block_m=16, block=16)
    _assert_same(ids.to(torch.int32), num_experts=20, block_m=16, block=16)


@in_process
def test_many_random_routings() -> None:
    """Seeded random shapes and routings (repeats within a token too): token counts, top_k 1-8, expert
    counts that are and are not powers of two, both block sizes, one chunk and several."""
    gen = torch.Generator().manual_seed(1234)
    for case in range(24):
        num_experts = int(torch.randint(1, 130, (1,), generator=gen))
        top_k = int(torch.randint(1, min(8, num_experts) + 1, (1,), generator=gen))
        num_tokens = int(torch.randint(1, 40, (1,), generator=gen))
        block_m = (16, 64)[case % 2]
        block = (16, None)[(case // 2) % 2]
        ids = _routing(num_tokens, top_k, num_experts, seed=case, distinct=case % 3 != 0)
        _assert_same(ids, num_experts, block_m, block)


def _fused_moe_module():  # noqa: ANN202
    """ops.triton.fused_moe the module (the package's `fused_moe` attribute is the function)."""
    return importlib.import_module("ops.triton.fused_moe")


@in_process
def test_fused_moe_is_bit_for_bit_the_same_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """fused_moe with the alignment kernel forced on (it runs on CUDA only by default) equals fused_moe
    with the torch alignment, bit for bit, and the kernel did run."""
    from ops.triton.moe_align import moe_align_block_size_kernel

    fm = _fused_moe_module()
    gen = torch.Generator().manual_seed(7)
    num_tokens, hidden, inter, num_experts, top_k = 9, 32, 16, 6, 2
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(DEVICE)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(DEVICE)
    weights, ids = torch.softmax(torch.randn(num_tokens, num_experts, generator=gen), -1).topk(top_k, -1)
    weights, ids = weights.to(DEVICE), ids.to(DEVICE)
    expected = fm.fused_moe(x, w13, w2, weights, ids)
    calls = []

    def kernel(*args: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        calls.append(args)
        return moe_align_block_size_kernel(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(fm, "align_kernel_applies", lambda topk_ids: True)
    monkeypatch.setattr(fm, "moe_align_block_size_kernel", kernel)
    assert torch.equal(fm.fused_moe(x, w13, w2, weights, ids), expected)
    assert len(calls) == 1


@in_process
def test_the_kernel_runs_on_cuda_only_up_to_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU keeps the torch ops (the spec); so do batches past ALIGN_KERNEL_MAX_PAIRS and
    WEIR_MOE_ALIGN_KERNEL=0 on a GPU."""
    fm = _fused_moe_module()

    def refuse(*args: object) -> None:
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(fm, "moe_align_block_size_kernel", refuse)
    ids = _routing(3, 2, 8, seed=0)
    if ids.is_cuda:
        monkeypatch.setenv("WEIR_MOE_ALIGN_KERNEL", "1")
        assert fm.align_kernel_applies(ids)
        assert not fm.align_kernel_applies(torch.zeros(fm.ALIGN_KERNEL_MAX_PAIRS + 1, 1, device=DEVICE))
        monkeypatch.setenv("WEIR_MOE_ALIGN_KERNEL", "0")
    assert not fm.align_kernel_applies(ids)
    for got, want in zip(fm.align_pairs(ids, 8, 16), fm.moe_align_block_size(ids, 8, 16), strict=True):
        assert torch.equal(got, want)
