"""The one-token LoRA GEMVs (ops/triton/lora_gemv.py) against their spec, F.linear then the reference
shrink and expand, under TRITON_INTERPRET=1 without a GPU: one, two and three sub-matrices at uneven
offsets (an output tile straddling two), ranks padded below max rank, a slot among others holding
different weights, slot -1, a split shrink and split-K. B's off-diagonal blocks hold garbage (the
engine's hold zeros) so that a column reading outside its own block shows up."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch
import torch.nn.functional as F

from ops import reference


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _dtype() -> torch.dtype:
    return torch.float32 if DEVICE == "cpu" else torch.bfloat16


def _layer(sizes: tuple[int, ...], k: int, max_rank: int, rank: int, num_slots: int, seed: int):
    """x [1, k], W [sum(sizes), k], A [slots, S * max_rank, k], B [slots, sum(sizes), S * max_rank]
    (block-diagonal, each block's columns past `rank` zero), B with garbage off its diagonal blocks,
    and the sub-matrices' offsets."""
    gen = torch.Generator().manual_seed(seed)
    n, dim = sum(sizes), len(sizes) * max_rank
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    x = torch.randn(1, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.05
    a = torch.zeros(num_slots, dim, k)
    b = torch.zeros(num_slots, n, dim)
    for i, (start, rows) in enumerate(zip(offsets, sizes, strict=True)):
        a[:, i * max_rank : i * max_rank + rank] = torch.randn(num_slots, rank, k, generator=gen) * 0.05
        b[:, start : start + rows, i * max_rank : i * max_rank + rank] = torch.randn(
            num_slots, rows, rank, generator=gen
        )
    garbage = b.clone()
    for i, (start, rows) in enumerate(zip(offsets, sizes, strict=True)):
        off = torch.ones(n, dtype=torch.bool)
        off[start : start + rows] = False
        garbage[:, off, i * max_rank : (i + 1) * max_rank] = 1e3
    dt = _dtype()
    return (
        x.to(DEVICE, dt),
        w.to(DEVICE, dt),
        a.to(DEVICE, dt),
        b.to(DEVICE, dt),
        garbage.to(DEVICE, dt),
        offsets,
    )


def _expected(x, w, a, b, slot: int, offsets) -> torch.Tensor:  # noqa: ANN001
    slots = torch.tensor([slot], dtype=torch.int32, device=x.device)
    t = reference.lora_shrink(x, a, slots)
    return reference.lora_expand(t, b, slots, F.linear(x.float(), w.float()), offsets)


def _err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


CASES = [
    # (sizes, k, max_rank, rank, block_n, block_k, split_k)
    ((50,), 1100, 16, 5, 16, 64, 1),  # one sub-matrix, ragged N; rank 5 padded to 16; shrink split 2
    ((50,), 1100, 16, 16, 16, 128, 2),  # split-K with an uneven last split
    ((40, 24, 24), 640, 8, 8, 16, 64, 1),  # q/k/v: the tile [32, 48) straddles q and k
    ((40, 24, 24), 1100, 8, 3, 8, 256, 2),  # q/k/v, rank 3 of 8, split-K, split shrink
    ((72, 72), 576, 16, 16, 32, 64, 2),  # gate/up, a tile straddling them
]


@in_process
@pytest.mark.parametrize(("sizes", "k", "max_rank", "rank", "block_n", "block_k", "split_k"), CASES)
@pytest.mark.parametrize("fuse_shrink", [False, True])
def test_gemv_with_the_lora_term_matches_linear_then_shrink_and_expand(
    sizes: tuple[int, ...],
    k: int,
    max_rank: int,
    rank: int,
    block_n: int,
    block_k: int,
    split_k: int,
    fuse_shrink: bool,
) -> None:
    from ops.triton.fp8_gemv import fp8_gemv
    from ops.triton.lora import lora_shrink
    from ops.triton.lora_gemv import _sync_counters, gemv_lora, gemv_lora_expand

    num_slots = 4
    x, w, a, b, garbage, offsets = _layer(sizes, k, max_rank, rank, num_slots, seed=k + split_k + rank)
    n = w.shape[0]
    ones = torch.ones(n, device=DEVICE)
    launch = dict(block_n=block_n, block_k=block_k, split_k=split_k)
    tol = 1e-5 if _dtype() == torch.float32 else 1e-2
    outs = {}
    for slot in (2, 1, -1):  # every slot holds other weights; -1: no adapter
        slots = torch.tensor([slot, 0, 3], dtype=torch.int32, device=DEVICE)  # only element 0 is the token's
        for _ in range(2):  # twice: counters left dirty by the first launch would break the second
            if fuse_shrink:
                out = gemv_lora(x, w, ones, a, garbage, slots, offsets, **launch)
            else:
                t = lora_shrink(x, a, slots[:1])
                assert t.shape[0] == (2 if k >= 1024 else 1)  # the shrink's partials, summed by the GEMV
                out = gemv_lora_expand(x, w, ones, t, garbage, slots, offsets, **launch)
            assert out.shape == (1, n) and out.dtype == x.dtype
            assert _err(out, _expected(x, w, a, b, slot, offsets)) < tol
        outs[slot] = out
    if fuse_shrink:
        assert _sync_counters(x.device).tolist() == [0, 0, 0]
    # no adapter: exactly the plain GEMV of the same launch (the LoRA epilogue adds nothing)
    assert torch.equal(outs[-1], fp8_gemv(x, w, ones, **launch))
    assert _err(outs[2], outs[1]) > 1e-2 and _err(outs[2], outs[-1]) > 1e-2


@in_process
def test_gemv_lora_refuses_what_it_cannot_serve() -> None:
    from ops.triton.lora_gemv import gemv_lora, gemv_lora_expand

    x, w, a, b, _, offsets = _layer((40, 24, 24), 64, 8, 8, 2, seed=0)
    ones = torch.ones(w.shape[0], device=DEVICE)
    slots = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    t = torch.zeros(1, 1, 24, device=DEVICE)
    with pytest.raises(ValueError, match=r"gemv_lora: x \(2, 64\) \(one token\), weight \(88, 64\)"):
        gemv_lora_expand(torch.cat([x, x]), w, ones, t, b, slots, offsets)
    with pytest.raises(ValueError, match=r"gemv_lora: slice_offsets \(0, 40, 64, 80\) for lora_dim 24"):
        gemv_lora_expand(x, w, ones, t, b, slots, [*offsets, 80])
    with pytest.raises(ValueError, match=r"gemv_lora: t \(1, 1, 16\) for one token, lora_dim 24"):
        gemv_lora_expand(x, w, ones, t[:, :, :16], b, slots, offsets)
    with pytest.raises(ValueError, match=r"gemv_lora: A \(2, 24, 32\) for lora_dim 24, K 64"):
        gemv_lora(x, w, ones, a[:, :, :32], b, slots, offsets)


# Launch options of ops.triton.lora_gemv (the sweep's grid, loadtest/sweep_lora_gemv.py): fused
# (shrink_chunk, reduce_t, early_b), and not fused (the separate shrink's chunk, early_b).
OPTION_CASES = [
    # (sizes, k, max_rank, rank, block_n, block_k, split_k)
    ((50,), 600, 16, 5, 16, 64, 1),  # one sub-matrix, rank 5 padded to 16
    ((40, 24, 24), 600, 8, 3, 8, 256, 2),  # q/k/v, a tile straddling q and k, rank 3 of 8, split-K
]


@in_process
@pytest.mark.parametrize(("sizes", "k", "max_rank", "rank", "block_n", "block_k", "split_k"), OPTION_CASES)
@pytest.mark.parametrize("shrink_chunk", [96, 512])
def test_one_launch_options_match_the_reference_and_change_no_bit(
    sizes: tuple[int, ...], k: int, max_rank: int, rank: int, block_n: int, block_k: int, split_k: int,
    shrink_chunk: int,
) -> None:  # fmt: skip
    """Every reduce_t / early_b combination at a worker chunk: within the reference's tolerance, and
    bit for bit the output without them (the partials are summed in split order wherever it happens);
    slot -1 exactly the plain GEMV; two launches in a row, counters back at zero after each."""
    from ops.triton.fp8_gemv import fp8_gemv
    from ops.triton.lora_gemv import _sync_counters, gemv_lora

    x, w, a, b, garbage, offsets = _layer(sizes, k, max_rank, rank, 3, seed=rank + shrink_chunk)
    ones = torch.ones(w.shape[0], device=DEVICE)
    launch = dict(block_n=block_n, block_k=block_k, split_k=split_k, shrink_chunk=shrink_chunk)
    tol = 1e-5 if _dtype() == torch.float32 else 1e-2
    for slot in (2, -1):
        slots = torch.tensor([slot], dtype=torch.int32, device=DEVICE)
        plain = gemv_lora(x, w, ones, a, garbage, slots, offsets, **launch)
        assert _sync_counters(x.device).tolist() == [0, 0, 0]
        assert _err(plain, _expected(x, w, a, b, slot, offsets)) < tol
        # slot -1: the workers still publish (and the last one still draws its ticket), nothing else
        combos = [(False, True), (True, False), (True, True)] if slot >= 0 else [(True, True)]
        for reduce_t, early_b in combos:
            for _ in range(2):
                out = gemv_lora(
                    x, w, ones, a, garbage, slots, offsets, reduce_t=reduce_t, early_b=early_b, **launch
                )
                assert _sync_counters(x.device).tolist() == [0, 0, 0]
                assert torch.equal(out, plain), (slot, reduce_t, early_b)
        if slot < 0:
            base = dict(block_n=block_n, block_k=block_k, split_k=split_k)
            assert torch.equal(plain, fp8_gemv(x, w, ones, **base))
        else:
            assert _err(plain, fp8_gemv(x, w, ones, block_n=block_n, block_k=block_k)) > 1e-2


@in_process
@pytest.mark.parametrize(("sizes", "k", "max_rank", "rank", "block_n", "block_k", "split_k"), OPTION_CASES)
def test_two_launch_options_match_the_reference_and_early_b_changes_no_bit(
    sizes: tuple[int, ...], k: int, max_rank: int, rank: int, block_n: int, block_k: int, split_k: int
) -> None:
    """The separate shrink at 128 and 256 columns a split (4 and 2 partials here), then the GEMV with
    and without B loaded before its K loop; slot -1 exactly the plain GEMV."""
    from ops.triton.fp8_gemv import fp8_gemv
    from ops.triton.lora import lora_shrink
    from ops.triton.lora_gemv import gemv_lora_expand

    x, w, a, b, garbage, offsets = _layer(sizes, k, max_rank, rank, 3, seed=rank)
    ones = torch.ones(w.shape[0], device=DEVICE)
    launch = dict(block_n=block_n, block_k=block_k, split_k=split_k)
    tol = 1e-5 if _dtype() == torch.float32 else 1e-2
    for slot in (1, -1):
        slots = torch.tensor([slot], dtype=torch.int32, device=DEVICE)
        for chunk, splits in ((128, 4), (256, 2)):
            t = lora_shrink(x, a, slots, chunk=chunk)
            assert t.shape[0] == splits
            plain = gemv_lora_expand(x, w, ones, t, garbage, slots, offsets, **launch)
            early = gemv_lora_expand(x, w, ones, t, garbage, slots, offsets, early_b=True, **launch)
            assert torch.equal(early, plain)
            assert _err(plain, _expected(x, w, a, b, slot, offsets)) < tol
            if slot < 0:
                assert torch.equal(plain, fp8_gemv(x, w, ones, **launch))


@in_process
def test_default_options_are_todays_launch() -> None:
    """No option given: a 512-column worker chunk (lora_shrink's split), no reduction, B after the loop,
    bit for bit; a chunk that is not a multiple of the worker's 32-column tile is refused."""
    from ops.triton.lora import lora_shrink
    from ops.triton.lora_gemv import SHRINK_BLOCK_K, SHRINK_CHUNK, gemv_lora

    assert (SHRINK_CHUNK, SHRINK_BLOCK_K) == (512, 32)
    x, w, a, b, _, offsets = _layer((40, 24, 24), 1100, 8, 8, 2, seed=7)
    # float32 everywhere: a bf16 output can round the two chunkings' float32 sums to the same values
    # (on CUDA it did), which would hide whether the chunk was used
    x, w, a, b = (t.float() for t in (x, w, a, b))
    ones = torch.ones(w.shape[0], device=DEVICE)
    slots = torch.ones(1, dtype=torch.int32, device=DEVICE)
    explicit = gemv_lora(x, w, ones, a, b, slots, offsets, shrink_chunk=512, reduce_t=False, early_b=False)
    assert torch.equal(gemv_lora(x, w, ones, a, b, slots, offsets), explicit)
    assert _err(gemv_lora(x, w, ones, a, b, slots, offsets, shrink_chunk=256), explicit) > 0  # chunk is used
    assert lora_shrink(x, a, slots).shape[0] == lora_shrink(x, a, slots, chunk=512).shape[0] == 2
    with pytest.raises(ValueError, match=r"gemv_lora: shrink_chunk 100 is not a positive multiple of 32"):
        gemv_lora(x, w, ones, a, b, slots, offsets, shrink_chunk=100)
    with pytest.raises(ValueError, match=r"lora_shrink: chunk 0 is not positive"):
        lora_shrink(x, a, slots, chunk=0)
