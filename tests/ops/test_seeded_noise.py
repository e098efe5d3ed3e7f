"""Seeded sampling noise (engine.worker.sampler's seeded rows): the torch spec and the Triton kernel
agree (hashes bit for bit, noise to the ulp, under TRITON_INTERPRET=1 on CPU), a row's noise is its own
whatever else is in the batch, and the values are Exponential(1): a broken hash fails here."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch

from ops import reference

# Small keys, the largest ones (2**63 - 1 is seed_for_step's top), and both sides of the 32-bit split.
KEYS = [0, 1, 2, 12345, 2**32 - 1, 2**32, 2**63 - 2, 2**63 - 1]


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


@in_process
@pytest.mark.parametrize("vocab_size", [5, 4096, 5000])  # under a block, one block, a ragged second block
def test_triton_kernel_equals_the_torch_spec(vocab_size: int) -> None:
    from ops.triton import seeded_noise

    keys = torch.tensor(KEYS, dtype=torch.int64)
    hashes = seeded_noise.seeded_hash(keys.to(DEVICE), vocab_size).cpu()
    assert torch.equal(hashes, reference.seeded_hash(keys, vocab_size))

    # Seeded rows scattered over a batch in no order; the other rows must stay as they were.
    rows = torch.tensor([7, 0, 3, 9, 1, 2, 4, 5], dtype=torch.int64)
    untouched = torch.full((10, vocab_size), -1.0)
    got = seeded_noise.seeded_exponential_(
        untouched.clone().to(DEVICE), rows.to(DEVICE), keys.to(DEVICE)
    ).cpu()
    want = reference.seeded_exponential_(untouched.clone(), rows, keys)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.equal(got[[6, 8]], untouched[[6, 8]]) and torch.equal(want[[6, 8]], untouched[[6, 8]])


@in_process
def test_triton_row_noise_is_the_same_alone_and_in_a_batch() -> None:
    from ops.triton import seeded_noise

    keys = torch.tensor(KEYS, dtype=torch.int64, device=DEVICE)
    batch = seeded_noise.seeded_exponential_(
        torch.zeros(len(KEYS), 300, device=DEVICE), torch.arange(len(KEYS), device=DEVICE), keys
    )
    for i in range(len(KEYS)):
        alone = seeded_noise.seeded_exponential_(
            torch.zeros(1, 300, device=DEVICE),
            torch.zeros(1, dtype=torch.int64, device=DEVICE),
            keys[i : i + 1],
        )
        assert torch.equal(alone[0], batch[i])


def test_torch_row_noise_is_the_same_alone_and_in_a_batch() -> None:
    # 300k columns: the CPU path hashes 3 rows at a time, so the batch crosses chunk boundaries.
    vocab_size = 300_000
    keys = torch.tensor([5, 2**63 - 1, 77, 1 << 40, 9, 3, 123456789], dtype=torch.int64)
    order = torch.tensor([4, 2, 6, 0, 5, 1, 3], dtype=torch.int64)  # row of each key in the batch
    batch = reference.seeded_exponential_(torch.zeros(7, vocab_size), order, keys)
    for i, key in enumerate(keys.tolist()):
        alone = reference.seeded_exponential_(
            torch.zeros(1, vocab_size), torch.tensor([0]), torch.tensor([key])
        )
        assert torch.equal(alone[0], batch[order[i]])


def test_uniforms_stay_inside_zero_one_and_noise_is_finite_and_positive() -> None:
    # The extreme hashes give the extreme uniforms: the lowest and highest 2**23 midpoints.
    h = torch.tensor([0, 511, 512, 2**31, 2**32 - 513, 2**32 - 1], dtype=torch.int64)
    u = reference.seeded_uniform(h)
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    assert u[0].item() == 2.0**-24 and u[-1].item() == 1 - 2.0**-24
    e = -u.log()
    assert bool(torch.isfinite(e).all()) and bool((e > 0).all())
    noise = reference.seeded_exponential_(torch.zeros(4, 50_000), torch.arange(4), torch.tensor(KEYS[:4]))
    assert bool(torch.isfinite(noise).all()) and bool((noise > 0).all())


def _stream(key: int, n: int) -> torch.Tensor:
    return reference.seeded_hash(torch.tensor([key], dtype=torch.int64), n)[0]  # [n] int64


def _chi_square_16(values: torch.Tensor) -> float:
    """values in [0, 16): the chi-square statistic of their 16-bin histogram against a flat one."""
    counts = torch.bincount(values, minlength=16).double()
    expected = values.numel() / 16
    return float(((counts - expected) ** 2 / expected).sum())


# 15 degrees of freedom: P(chi2 > 40) is about 5e-4, and the values are fixed, so it never flakes.
CHI2_BOUND = 40.0


def test_noise_is_exponential_and_uniforms_are_flat() -> None:
    keys = torch.tensor([3, 2**63 - 1, 1 << 32, 987654321], dtype=torch.int64)
    hashes = reference.seeded_hash(keys, 50_000).flatten()  # [200k]
    noise = reference.seeded_exponential_(torch.zeros(4, 50_000), torch.arange(4), keys).flatten()
    assert abs(noise.mean().item() - 1.0) < 0.01
    assert abs(noise.var().item() - 1.0) < 0.03  # Exponential(1): variance 1 too
    u = reference.seeded_uniform(hashes)
    assert _chi_square_16((u * 16).long()) < CHI2_BOUND  # the top bits, the ones the noise uses
    assert _chi_square_16(hashes & 15) < CHI2_BOUND  # and the low bits: the whole hash is mixed


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()


@pytest.mark.parametrize(
    ("key_a", "key_b"),
    [(1000, 1001), (7, 7 + (1 << 32)), (0, 2**63 - 1)],  # next step of a row, other high half, extremes
)
def test_different_keys_give_uncorrelated_streams(key_a: int, key_b: int) -> None:
    n = 100_000
    a, b = _stream(key_a, n), _stream(key_b, n)
    assert abs(_corr(a, b)) < 0.02
    assert abs(_corr(a[:-1], a[1:])) < 0.02  # nor is a stream correlated with itself one column on
    assert (a == b).sum().item() < 5  # 2**-32 per column: ~0 expected
