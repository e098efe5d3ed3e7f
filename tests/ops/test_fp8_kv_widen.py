"""Paged attention's widened fp8 path (WEIR_FP8_KV_WIDEN=1, ops/triton/fp8_kv_read.py) under
TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter), on CUDA with the GPU's conversion too:
the words widen every byte value to what torch's fp8 -> float16 cast gives, in the cache's element
order; float16 queries get the bytes path's output bit for bit; bfloat16 queries (whose dots now run in
float16) match the reference; float32 queries and misaligned caches keep the bytes path. A head of 48
(not a power of two) reads its 12 words a row in 16 lanes, the rest masked."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import importlib

import pytest
import torch
import triton
import triton.language as tl

import ops.triton as impl
from ops import reference
from ops.triton.fp8_kv_read import E4M3, E5M2, widen_words
from ops.triton.paged_attention import AttentionConfig, paged_attention_with_config
from tests.ops.test_triton_kernels import DECODES, MIXED, make_batch, poisoned_allocations, rel_err

# the module (ops.triton.paged_attention is also the name of the function)
pa = importlib.import_module("ops.triton.paged_attention")
FORMATS = {torch.float8_e4m3fn: E4M3.value, torch.float8_e5m2: E5M2.value}
# the GPU's conversion only where it exists (sm_89+); the interpreter runs Triton's per-byte one
HW_CVT = [False] + ([True] if DEVICE == "cuda" and torch.cuda.get_device_capability() >= (8, 9) else [])


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


@triton.jit
def _widen_kernel(words_ptr, out_ptr, C: tl.constexpr, FORMAT: tl.constexpr, HW: tl.constexpr):
    """[R, C] int32 words -> [R, 4C] float16, R = 16 (one program)."""
    rows = tl.arange(0, 16)
    words = tl.load(words_ptr + rows[:, None] * C + tl.arange(0, C)[None, :])
    out = widen_words(words, FORMAT, HW)
    tl.store(out_ptr + rows[:, None] * (4 * C) + tl.arange(0, 4 * C)[None, :], out)


@in_process
@pytest.mark.parametrize("hw_cvt", HW_CVT, ids=lambda hw: "ptx" if hw else "per-byte")
@pytest.mark.parametrize("cache_dtype", list(FORMATS), ids=["e4m3", "e5m2"])
def test_every_byte_widens_to_torchs_float16_in_order(cache_dtype: torch.dtype, hw_cvt: bool) -> None:
    """All 256 bytes, each at every position of a word (the 16 x 16 grid shifted per row), read as words
    and widened: torch's cast of the same bytes, element for element (NaN where it gives NaN)."""
    # [16, 256]: row r holds byte (j + r) % 256 at j, so rows 0-3 put each value in each lane of a word
    raw = ((torch.arange(256)[None, :] + torch.arange(16)[:, None]) % 256).to(torch.uint8).to(DEVICE)
    words = raw.view(torch.int32)  # [16, 64]
    out = torch.empty(16, 256, dtype=torch.float16, device=DEVICE)
    _widen_kernel[(1,)](words, out, 64, FORMATS[cache_dtype], hw_cvt)
    expected = raw.view(cache_dtype).to(torch.float16)
    nan = expected.isnan()
    assert 0 < nan.sum() < 16 * 8  # e4m3: 0x7f and 0xff; e5m2: 0x7d-0x7f and 0xfd-0xff
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan], expected[~nan])
    positions = {(int(b), j % 4) for row in raw.cpu() for j, b in enumerate(row)}
    assert len(positions) == 256 * 4  # the check covered each byte value in each lane of a word


def _fp8_batch(
    q_lens: list[int], seq_lens: list[int], cache_dtype: torch.dtype, dtype: torch.dtype, head_dim: int = 32
) -> dict:
    """A paged batch (8 heads, 2 KV heads, head_dim 32) with fp8 caches of randn * 2 and per-head scales
    far apart, so a tile read from the wrong place or with another head's scale fails."""
    batch = make_batch(q_lens, seq_lens, 8, 2, head_dim, 16, dtype, seed=7)
    for name in ("k_cache", "v_cache"):
        batch[name] = (batch[name].float() * 2.0).to(cache_dtype)
    batch["k_scale"] = torch.tensor([2.0, 0.02], device=DEVICE)
    batch["v_scale"] = torch.tensor([0.25, 8.0], device=DEVICE)
    return batch


def _attend(batch: dict, widen: bool, split: int) -> torch.Tensor:
    config = AttentionConfig(block_m=16, tile=16, num_segments=split, fp8_widen=widen)
    with poisoned_allocations():
        return paged_attention_with_config(**batch, config=config)


SHAPES = {"mixed": (MIXED, 1), "split-kv-decode": (DECODES, 4)}


@in_process
@pytest.mark.parametrize(
    ("shape", "cache_dtype", "head_dim"),
    [
        *((shape, fmt, 32) for shape in SHAPES for fmt in FORMATS),
        ("mixed", torch.float8_e4m3fn, 48),  # a padded head: 12 words a row read in 16 lanes
        ("split-kv-decode", torch.float8_e5m2, 48),
        ("mixed", torch.float8_e4m3fn, 40),  # 10 words a row in 16 lanes; rows 8-byte aligned
    ],
    ids=lambda v: {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}.get(v, str(v)),
)
def test_float16_queries_get_the_bytes_paths_output_bit_for_bit(
    cache_dtype: torch.dtype, shape: str, head_dim: int
) -> None:
    """With float16 queries both paths feed the same float16 values to the same dots: the widened tile
    (words, masked tails, per-head scales) must equal what the bytes path reads, so any misread fails."""
    (q_lens, seq_lens), split = SHAPES[shape]
    batch = _fp8_batch(q_lens, seq_lens, cache_dtype, torch.float16, head_dim)
    bytes_path, widened = _attend(batch, False, split), _attend(batch, True, split)
    assert torch.equal(widened, bytes_path)
    assert rel_err(widened, reference.paged_attention(**batch)) < 5e-3


@in_process
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cache_dtype", list(FORMATS), ids=["e4m3", "e5m2"])
def test_bfloat16_queries_match_the_reference(cache_dtype: torch.dtype, shape: str) -> None:
    """bfloat16 queries run their dots in float16 on the widened tiles: the reference (float32 over the
    dequantized cache) to within bfloat16's rounding of the output."""
    (q_lens, seq_lens), split = SHAPES[shape]
    batch = _fp8_batch(q_lens, seq_lens, cache_dtype, torch.bfloat16)
    out = _attend(batch, True, split)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference.paged_attention(**batch)) < 8e-3


@in_process
def test_a_query_beyond_float16_is_clamped_not_inf() -> None:
    """A bfloat16 query element past float16's range (65504) is clamped to it: the output is the
    reference's for the clamped query, finite, where an unclamped cast would give inf and NaN."""
    batch = _fp8_batch(*DECODES, torch.float8_e4m3fn, torch.bfloat16)
    batch["query"][:, 0, 0] = 1.0e6
    out = _attend(batch, True, 1)
    clamped = {**batch, "query": batch["query"].float().clamp(-65504.0, 65504.0).to(torch.bfloat16)}
    assert out.isfinite().all()
    assert rel_err(out, reference.paged_attention(**clamped)) < 8e-3


@in_process
def test_float32_queries_and_misaligned_caches_keep_the_bytes_path() -> None:
    batch = _fp8_batch(*MIXED, torch.float8_e4m3fn, torch.float32)
    query, k_cache, v_cache = batch["query"], batch["k_cache"], batch["v_cache"]
    assert pa._kv_widen(query, k_cache, v_cache) == 0  # float32 dots stay float32
    assert torch.equal(_attend(batch, True, 1), _attend(batch, False, 1))
    half = query.to(torch.float16)
    assert pa._kv_widen(half, k_cache, v_cache) == E4M3.value
    assert pa._kv_widen(half, k_cache.to(torch.float8_e5m2), v_cache.to(torch.float8_e5m2)) == E5M2.value
    assert pa._kv_widen(half, k_cache.to(torch.float16), v_cache.to(torch.float16)) == 0
    flat = torch.empty(k_cache.numel() + 1, dtype=k_cache.dtype, device=k_cache.device)
    shifted = flat[1:].view(k_cache.shape)  # rows one byte off a word
    assert shifted.data_ptr() % 4 == 1
    assert pa._kv_widen(half, k_cache, shifted) == 0


@in_process
def test_the_default_entry_point_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """WEIR_FP8_KV_WIDEN is read when a shape's launch plan is made: 1 widens (bfloat16 queries then
    match the reference), anything but 0 or 1 is refused naming the variable."""
    batch = _fp8_batch(*DECODES, torch.float8_e4m3fn, torch.bfloat16)
    monkeypatch.setattr(pa, "_PLANS", {})
    monkeypatch.setenv("WEIR_FP8_KV_WIDEN", "1")
    out = impl.paged_attention(**batch)
    assert rel_err(out, reference.paged_attention(**batch)) < 8e-3
    assert all(plan.fp8_widen for plan in pa._PLANS.values())
    monkeypatch.setattr(pa, "_PLANS", {})
    monkeypatch.setenv("WEIR_FP8_KV_WIDEN", "yes")
    with pytest.raises(ValueError, match=r"WEIR_FP8_KV_WIDEN must be 0 or 1 \(unset: 1\); got 'yes'"):
        impl.paged_attention(**batch)


@in_process
def test_widened_decode_launches_tiles_of_twice_the_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode batch over a widened fp8 cache takes tiles of twice the 16-bit path's positions (the same
    bytes a tile) and half its split-KV segments; prefill, the bytes path and a bf16 cache keep theirs."""
    seen: list[tuple[int, int]] = []
    real_launch = pa._launch

    def capture(*args: object, **kw: object) -> torch.Tensor:
        _block_m, tile, segments = args[-6:-3]
        seen.append((tile, segments))  # type: ignore[arg-type]
        return real_launch(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pa, "_launch", capture)
    monkeypatch.setattr(pa, "_PLANS", {})
    monkeypatch.setenv("WEIR_FP8_KV_WIDEN", "1")
    decodes = _fp8_batch([1] * 4, [700, 1, 64, 1500], torch.float8_e4m3fn, torch.bfloat16)
    base_tile = pa._base_launch(4, 32, decode=True)[1]
    segments = pa._decode_segments(4 * 2, 1500, base_tile, pa._num_sms(-1))
    assert segments >= 2  # the case halves a real split
    out = impl.paged_attention(**decodes)
    assert seen[-1] == (2 * base_tile, segments // 2)
    assert rel_err(out, reference.paged_attention(**decodes)) < 8e-3
    bf16 = {
        **decodes,
        "k_cache": decodes["k_cache"].to(torch.bfloat16),
        "v_cache": decodes["v_cache"].to(torch.bfloat16),
    }
    impl.paged_attention(**bf16)
    assert seen[-1] == (base_tile, segments)
    prefill = _fp8_batch(*MIXED, torch.float8_e4m3fn, torch.bfloat16)
    impl.paged_attention(**prefill)
    assert seen[-1][0] == pa._base_launch(4, 32, decode=False)[1]
    monkeypatch.setattr(pa, "_PLANS", {})
    monkeypatch.setenv("WEIR_FP8_KV_WIDEN", "0")
    impl.paged_attention(**decodes)
    assert seen[-1] == (base_tile, segments)
