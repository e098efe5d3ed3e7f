"""ops.triton.sample_argmax against its spec, ops.reference.sample_argmax, under TRITON_INTERPRET=1
(in a GPU run, on the GPU): the exact index for every row, with and without noise, for batches that
take one slice per row and ones that split a row over many programs (the last merges), ties, rows of
-inf, a draw of 0, and the split counters left clean."""

from __future__ import annotations

import pytest
import torch

from ops import reference
from tests.ops.triton_interpreter import (
    DEVICE,
    in_process,
    only_in_subprocess,
    rerun_in_fresh_process,
)


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _impl():
    from ops.triton.sample_argmax import sample_argmax

    return sample_argmax


@in_process
@pytest.mark.parametrize("rows", [1, 3, 600])
@pytest.mark.parametrize("vocab_size", [1000, 5003])
@pytest.mark.parametrize("with_noise", [False, True])
def test_matches_reference(rows: int, vocab_size: int, with_noise: bool) -> None:
    from ops.triton.split_k import split_counters

    g = torch.Generator().manual_seed(rows * vocab_size + with_noise)
    logits = (torch.randn(rows, vocab_size, generator=g) * 4).to(DEVICE)
    noise = torch.empty(rows, vocab_size).exponential_(generator=g).to(DEVICE) if with_noise else None
    got = _impl()(logits, noise)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got.cpu(), reference.sample_argmax(logits, noise).cpu())
    assert int(split_counters(logits.device).count_nonzero()) == 0


@in_process
def test_ties_minus_inf_and_zero_draws() -> None:
    vocab_size = 4100  # a few slices per row, the last one partial
    logits = torch.zeros(4, vocab_size)
    logits[0, [7, 3000, 4099]] = 5.0  # a tie across slices: the first index wins
    logits[1] = float("-inf")  # every token masked: index 0, as torch.argmax
    logits[2, 4099] = 1.0  # the very last entry
    logits[3, :2048] = float("-inf")
    noise = torch.ones(4, vocab_size)
    noise[3, 2100] = 0.0  # a draw of exactly 0: clamped, so log stays finite and this row picks it
    for n in (None, noise):
        got = _impl()(logits.to(DEVICE), None if n is None else n.to(DEVICE)).cpu()
        assert torch.equal(got, reference.sample_argmax(logits, n)), (n is None, got)
    assert _impl()(logits.to(DEVICE), noise.to(DEVICE)).tolist() == [7, 0, 4099, 2100]


@in_process
def test_samples_softmax() -> None:
    """The draw follows softmax(logits): 4,000 rows of the same 5-token logits, counts within 5 sigma."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(4000, 5).contiguous()
    noise = torch.empty(4000, 5).exponential_(generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(_impl()(logits.to(DEVICE), noise.to(DEVICE)).cpu(), minlength=5).float()
    expected = probs * 4000
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs)).sqrt()).all(), counts
