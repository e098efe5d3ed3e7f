"""FP8 KV cache kernels against their torch reference (ops/reference.py), under TRITON_INTERPRET=1
without a GPU (tests.ops.triton_interpreter): the KV write is the reference bit for bit (both round to
nearest even, saturating) with per-tensor and per-head scales, and paged attention over fp8 caches
matches the reference reading the same caches, for mixed prefill+decode batches and split-KV decodes.
Scales are [num_kv_heads] float32 device tensors; per-head ones differ by orders of magnitude between
heads, so a kernel applying one head's scale to another fails. Heads of 32, and of 48 (not a power of
two: padded lanes, ops/triton/head_dim.py)."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch

import ops.triton as impl
from ops import reference
from ops.triton.paged_attention import AttentionConfig, paged_attention_with_config
from tests.ops.test_triton_kernels import DECODES, MIXED, make_batch, poisoned_allocations, rel_err

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
# (mantissa bits, smallest subnormal) of each format: the bound of a round trip
FORMAT = {torch.float8_e4m3fn: (3, 2.0**-9), torch.float8_e5m2: (2, 2.0**-16)}


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _keys(num_tokens: int, num_kv_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    """[num_tokens, num_kv_heads, head_dim]: magnitudes from fp8-subnormal to past the e4m3 range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    magnitude = 10.0 ** torch.randint(-4, 4, (num_tokens, num_kv_heads, 1), generator=g).float()
    x = x * magnitude
    x[0, 0, :2] = torch.tensor([60000.0, -60000.0])  # saturates either format at scale 0.5
    x[0, 0, 2:4] = torch.tensor([2.0**-17, -(2.0**-11)])  # below / within the fp8 subnormals
    return x


def _positive_zero(cache: torch.Tensor) -> torch.Tensor:
    """The cache's bytes with -0 (0x80 in both fp8 formats) written as +0."""
    raw = cache.view(torch.uint8)
    return torch.where(raw == 0x80, torch.zeros_like(raw), raw)


def _scales(*values: float) -> torch.Tensor:
    """[num_kv_heads] float32 on the kernels' device."""
    return torch.tensor(values, dtype=torch.float32, device=DEVICE)


# (k_scale, v_scale) per KV head: per tensor (one value repeated), and per head (very different)
WRITE_SCALES = {"per-tensor": ((0.5, 0.5), (3.0, 3.0)), "per-head": ((0.5, 40.0), (3.0, 0.01))}


@in_process
@pytest.mark.parametrize(
    ("scales", "head_dim"), [("per-tensor", 32), ("per-head", 32), ("per-head", 48)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("cache_dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_write_matches_reference_bit_for_bit(
    cache_dtype: torch.dtype, dtype: torch.dtype, scales: str, head_dim: int
) -> None:
    num_blocks, block_size, num_kv_heads = 6, 8, 2
    k_scale, v_scale = (_scales(*s) for s in WRITE_SCALES[scales])
    key = _keys(9, num_kv_heads, head_dim, seed=1).to(dtype).to(DEVICE)
    value = _keys(9, num_kv_heads, head_dim, seed=2).to(dtype).to(DEVICE)
    slot_mapping = torch.tensor([3, 17, -1, 40, 41, -1, 47, 0, 30], dtype=torch.int64, device=DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = {}
    for name, op in (("ref", reference.write_kv_cache), ("triton", impl.write_kv_cache)):
        k_cache = torch.zeros(shape, dtype=cache_dtype, device=DEVICE)
        v_cache = torch.zeros(shape, dtype=cache_dtype, device=DEVICE)
        op(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        caches[name] = (k_cache, v_cache)
    for ref, got in zip(caches["ref"], caches["triton"], strict=True):
        # Bit for bit, except the sign of a zero: a negative value that rounds to zero is -0 (0x80) in
        # torch's cast and +0 in the compiled kernel on a GPU; both read back as 0.
        assert torch.equal(_positive_zero(ref), _positive_zero(got))
    # The reference itself: each head's cache * its scale is the key within half a step of the format,
    # or saturated.
    mant, tiny = FORMAT[cache_dtype]
    fp8_max = torch.finfo(cache_dtype).max
    k_cache = caches["ref"][0].view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    stored = k_cache[slot_mapping[valid]].float().cpu()  # [7, heads, dim]
    x = key[valid].float().cpu() / k_scale.cpu()[:, None]  # [7, heads, dim]
    in_range = x.abs() <= fp8_max
    err = (stored - x.clamp(-fp8_max, fp8_max)).abs()
    assert (err <= x.abs() * 2.0 ** -(mant + 1) + tiny / 2).all()
    assert in_range.any() and (~in_range).any()  # both regimes exercised
    assert (stored[~in_range].abs() == fp8_max).all()  # saturated, never NaN
    # Slots nobody wrote stay zero.
    assert (k_cache[[1, 2, 4, 46]].float() == 0).all()


@in_process
def test_fp8_write_per_head_is_each_head_quantized_with_its_own_scale() -> None:
    """Head h's bytes are exactly fp8(x_h / scale_h): what writing that head alone with a per-tensor
    scale of scale_h stores, with the heads' scales 0.01 and 50 apart by 5000x."""
    num_kv_heads, head_dim = 2, 32
    key = _keys(5, num_kv_heads, head_dim, seed=3).to(DEVICE)
    value = _keys(5, num_kv_heads, head_dim, seed=4).to(DEVICE)
    slot_mapping = torch.tensor([0, 3, 9, -1, 12], dtype=torch.int64, device=DEVICE)
    k_scale, v_scale = _scales(0.01, 50.0), _scales(50.0, 0.01)
    shape = (2, 8, num_kv_heads, head_dim)
    k_cache = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    impl.write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    valid = slot_mapping >= 0
    for h in range(num_kv_heads):
        for x, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
            expected = (x[valid, h].float() / scale[h].item()).clamp(-448, 448).to(torch.float8_e4m3fn)
            got = cache.view(-1, num_kv_heads, head_dim)[slot_mapping[valid], h]
            assert torch.equal(_positive_zero(got), _positive_zero(expected))
    # and the heads really were quantized differently: head 1 with head 0's scale stores other bytes
    other = (key[valid, 1].float() / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert not torch.equal(
        k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping[valid], 1].view(torch.uint8),
        other.view(torch.uint8),
    )


@in_process
@pytest.mark.parametrize("cache_dtype", FP8, ids=["e4m3", "e5m2"])
def test_fp8_write_without_scales_is_scale_one(cache_dtype: torch.dtype) -> None:
    """No scales (None) quantizes x itself, as scales of 1.0 do, in both implementations."""
    key = _keys(4, 2, 32, seed=5).to(DEVICE)
    slot_mapping = torch.tensor([1, 2, 5, 7], dtype=torch.int64, device=DEVICE)
    caches = []
    for op, scales in (
        (impl.write_kv_cache, ()),
        (reference.write_kv_cache, ()),
        (impl.write_kv_cache, (_scales(1.0, 1.0), _scales(1.0, 1.0))),
    ):
        k_cache = torch.zeros(1, 8, 2, 32, dtype=cache_dtype, device=DEVICE)
        op(key, key, k_cache, torch.zeros_like(k_cache), slot_mapping, *scales)
        caches.append(_positive_zero(k_cache))
    assert torch.equal(caches[0], caches[1]) and torch.equal(caches[0], caches[2])


# (k_scale, v_scale) per KV head of the paged batches (2 KV heads)
ATTN_SCALES = {"per-tensor": ((2.0, 2.0), (0.25, 0.25)), "per-head": ((2.0, 0.02), (0.25, 8.0))}


def _fp8_batch(
    q_lens: list[int],
    seq_lens: list[int],
    cache_dtype: torch.dtype,
    dtype: torch.dtype,
    seed: int,
    scales: str = "per-tensor",
    head_dim: int = 32,
) -> dict:
    """make_batch's paged batch (8 heads, 2 KV heads) with fp8 caches holding randn * 2 (well inside
    both formats) and the ATTN_SCALES[scales] scales: KV head h's keys are cache * k_scale[h]."""
    batch = make_batch(q_lens, seq_lens, 8, 2, head_dim, 16, dtype, seed=seed)
    for name in ("k_cache", "v_cache"):
        batch[name] = (batch[name].float() * 2.0).to(cache_dtype)
    batch["k_scale"], batch["v_scale"] = (_scales(*s) for s in ATTN_SCALES[scales])
    return batch


@in_process
@pytest.mark.parametrize("scales", ATTN_SCALES, ids=list(ATTN_SCALES))
@pytest.mark.parametrize(
    ("cache_dtype", "dtype", "split", "head_dim"),
    [
        (torch.float8_e4m3fn, torch.float32, False, 32),
        (torch.float8_e4m3fn, torch.float16, True, 32),
        (torch.float8_e5m2, torch.float16, False, 32),
        (torch.float8_e5m2, torch.float32, True, 32),
        # a padded head: the bytes path (float32 queries) and the widened one (float16, words masked)
        (torch.float8_e4m3fn, torch.float32, False, 48),
        (torch.float8_e5m2, torch.float16, True, 48),
    ],
    ids=[
        "e4m3-fp32-mixed",
        "e4m3-fp16-split-kv",
        "e5m2-fp16-mixed",
        "e5m2-fp32-split-kv",
        "e4m3-fp32-mixed-head48",
        "e5m2-fp16-split-kv-head48",
    ],
)
def test_fp8_paged_attention_matches_reference(
    cache_dtype: torch.dtype, dtype: torch.dtype, split: bool, head_dim: int, scales: str
) -> None:
    q_lens, seq_lens = DECODES if split else MIXED
    batch = _fp8_batch(q_lens, seq_lens, cache_dtype, dtype, seed=11, scales=scales, head_dim=head_dim)
    ref = reference.paged_attention(**batch)
    unscaled = reference.paged_attention(**{**batch, "k_scale": None, "v_scale": None})
    assert rel_err(unscaled, ref) > 0.5  # the scales matter, so a kernel ignoring them would fail
    if scales == "per-head":  # and each head's: a kernel reading another head's scale would fail
        swapped = {name: batch[name].flip(0) for name in ("k_scale", "v_scale")}
        assert rel_err(reference.paged_attention(**{**batch, **swapped}), ref) > 0.5
        for name in ("k_scale", "v_scale"):  # either scale alone matters too
            first = batch[name][:1].expand(2)  # head 0's scale for both heads
            assert rel_err(reference.paged_attention(**{**batch, name: first}), ref) > 0.05
    config = AttentionConfig(block_m=16, tile=16, num_segments=4 if split else 1)
    with poisoned_allocations():
        out = paged_attention_with_config(**batch, config=config)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 5e-3)


@in_process
@pytest.mark.parametrize("scales", ATTN_SCALES, ids=list(ATTN_SCALES))
def test_fp8_paged_attention_default_entry_point(scales: str) -> None:
    """The public entry point (its own launch heuristic, decode launch) on fp8 caches."""
    batch = _fp8_batch(*DECODES, torch.float8_e4m3fn, torch.float32, seed=12, scales=scales)
    with poisoned_allocations():
        out = impl.paged_attention(**batch)
    assert rel_err(out, reference.paged_attention(**batch)) < 1e-5
