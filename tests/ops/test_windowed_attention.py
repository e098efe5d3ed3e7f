"""Sliding-window attention and attention logit softcapping in the paged attention kernels
(ops/triton/paged_attention.py: prefill, decode, split-KV decode, fp8 caches, the fused decode) against
the reference (ops/reference.py), under TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter).

Windows smaller than a block (5 of 8), of one key (1), spanning blocks and tiles (20), over prefill
chunks whose queries sit mid-sequence after a cached prefix and over decodes; softcaps small enough to
change the output. The kernels skip tiles wholly before a query block's window: the values there are
NaN in one test, which any read would spread into the output. Heads of 48 (not a power of two: padded
lanes, ops/triton/head_dim.py) take the same paths.
"""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import sys

import pytest
import torch

import ops.triton as impl
from engine.model.layers.rotary import build_cos_sin_cache
from ops import reference
from ops.triton.paged_attention import AttentionConfig, paged_attention_with_config
from tests.ops.test_decode_attention import HEAD_DIM, _batch
from tests.ops.test_fp8_kv_kernels import _fp8_batch
from tests.ops.test_triton_kernels import DECODES, MIXED, make_batch, poisoned_allocations, rel_err


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def test_reference_is_attention_over_the_window_with_capped_scores() -> None:
    """The spec itself: a query at position p attends to keys p - W + 1 .. p only (transformers'
    `kv_idx > q_idx - sliding_window`), with scores softcap * tanh(scores / softcap)."""
    batch = make_batch([4], [30], 2, 1, 16, 8, torch.float32, seed=3)
    window, softcap = 7, 1.5
    out = reference.paged_attention(**batch, sliding_window=window, softcap=softcap)
    blocks = batch["block_tables"][0, :4].long()
    k = batch["k_cache"][blocks].reshape(-1, 16)[:30]  # [30, 16] (one KV head)
    v = batch["v_cache"][blocks].reshape(-1, 16)[:30]
    for i, p in enumerate(range(26, 30)):
        for h in range(2):
            q = batch["query"][i, h]
            scores = k[p - window + 1 : p + 1] @ q * batch["scale"]  # [window]
            probs = torch.softmax(softcap * torch.tanh(scores / softcap), dim=0)
            torch.testing.assert_close(out[i, h], probs @ v[p - window + 1 : p + 1])


def _check(
    batch: dict, config: AttentionConfig, window: int | None, softcap: float | None, tol: float
) -> None:
    ref = reference.paged_attention(**batch, sliding_window=window, softcap=softcap)
    plain = reference.paged_attention(**batch)
    assert rel_err(ref, plain) > 0.05  # the window / softcap change this batch's output
    with poisoned_allocations():
        out = paged_attention_with_config(**batch, config=config, sliding_window=window, softcap=softcap)
    assert rel_err(out, ref) < tol


# (window, softcap): a window under one block (5 < 8) and under a prefill block's 8 rows, a window of a
# lone key, one spanning 3 blocks and 2 tiles, a softcap alone, both together
VARIANTS = {"w5": (5, None), "w1": (1, None), "w20": (20, None), "cap": (None, 1.0), "w5-cap": (5, 2.0)}


@in_process
@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-kv"])
def test_windowed_softcapped_attention_matches_reference(variant: str, split: bool) -> None:
    """MIXED: prefill chunks of 6 and 11 queries after cached prefixes of 7 and 20 keys, and decodes at
    contexts 1, 18 and 40; group 2 (block_m 16 = 8 query rows), tiles of 16 over blocks of 8."""
    window, softcap = VARIANTS[variant]
    batch = make_batch(*MIXED, 4, 2, 32, 8, torch.float32, seed=21)
    config = AttentionConfig(block_m=16, tile=16, num_segments=4 if split else 1)
    _check(batch, config, window, softcap, 1e-5)


@in_process
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-kv"])
def test_windowed_softcapped_attention_over_a_padded_head(split: bool) -> None:
    """A head of 48 (64 lanes, 16 masked) with a window under a block and a softcap."""
    batch = make_batch(*MIXED, 4, 2, 48, 8, torch.float32, seed=26)
    config = AttentionConfig(block_m=16, tile=16, num_segments=4 if split else 1)
    _check(batch, config, 5, 2.0, 1e-5)


@in_process
def test_windowed_softcapped_decode_float16_default_entry_point() -> None:
    batch = make_batch(*DECODES, 8, 2, 32, 16, torch.float16, seed=22)
    ref = reference.paged_attention(**batch, sliding_window=12, softcap=2.0)
    with poisoned_allocations():
        out = impl.paged_attention(**batch, sliding_window=12, softcap=2.0)
    assert rel_err(out, ref) < 5e-3


@in_process
@pytest.mark.parametrize("widen", [False, True], ids=["fp8-bytes", "fp8-widened"])
def test_windowed_softcapped_attention_over_fp8_caches(widen: bool) -> None:
    """The fp8 paths: bytes widened in the dot's layout (float32 queries) and words widened to float16
    tiles (float16 queries), per-head scales folded as without a window."""
    dtype = torch.float16 if widen else torch.float32
    batch = _fp8_batch(*MIXED, torch.float8_e4m3fn, dtype, seed=23, scales="per-head")
    config = AttentionConfig(block_m=16, tile=16, num_segments=1, fp8_widen=widen)
    _check(batch, config, 9, 3.0, 5e-3 if widen else 1e-5)


def _poison_before_windows(batch: dict, window: int, tile: int) -> dict:
    """A copy of `batch` whose V rows wholly before every query block's first tile are NaN: blocks no
    program of a windowed launch may read (a NaN value times a probability of 0 is still NaN)."""
    poisoned = {**batch, "v_cache": batch["v_cache"].clone()}
    block_size = batch["k_cache"].shape[1]
    starts = batch["query_start_loc"].tolist()
    for s, seq_len in enumerate(batch["seq_lens"].tolist()):
        first_pos = seq_len - (starts[s + 1] - starts[s])  # the first query block's first row
        lowest = max(first_pos - window + 1, 0) // tile * tile  # that row's window's first tile
        for blk in range(lowest // block_size):
            poisoned["v_cache"][int(batch["block_tables"][s, blk])] = float("nan")
    return poisoned


@in_process
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-kv"])
def test_tiles_before_the_window_are_never_read(split: bool) -> None:
    """Decodes 70 and 33 keys deep and a prefill chunk 100 keys into its sequence, window 10: the blocks
    before each window hold NaN values, yet the output is the reference's over the clean cache."""
    q_lens, seq_lens = [1, 5, 1], [70, 105, 33]
    batch = make_batch(q_lens, seq_lens, 4, 2, 32, 8, torch.float32, seed=24)
    config = AttentionConfig(block_m=16, tile=16, num_segments=4 if split else 1)
    poisoned = _poison_before_windows(batch, 10, 16)
    assert torch.isnan(poisoned["v_cache"]).any()
    ref = reference.paged_attention(**batch, sliding_window=10)
    with poisoned_allocations():
        out = paged_attention_with_config(**poisoned, config=config, sliding_window=10)
    assert rel_err(out, ref) < 1e-5


def _release_behind_windows(batch: dict, window: int) -> dict:
    """A copy of `batch` as the KV cache manager may leave it (engine/core/sliding_window.py): every
    block wholly before the block holding a sequence's first window key (of its first query) released
    and given to someone else, here filled with NaN keys and values. Finer than a tile: the kernels'
    tiles (16, 64) span several blocks (8), so a tile may start in such a block."""
    released = {**batch, "k_cache": batch["k_cache"].clone(), "v_cache": batch["v_cache"].clone()}
    block_size = batch["k_cache"].shape[1]
    starts = batch["query_start_loc"].tolist()
    for s, seq_len in enumerate(batch["seq_lens"].tolist()):
        first_pos = seq_len - (starts[s + 1] - starts[s])
        for blk in range(max(first_pos - window + 1, 0) // block_size):
            for name in ("k_cache", "v_cache"):
                released[name][int(batch["block_tables"][s, blk])] = float("nan")
    return released


# Decodes 70, 33 and 9 keys deep and a prefill chunk 100 keys into its sequence: window 10's first key
# mid-tile (16) and mid-block (8) for the 70- and 105-key rows.
RELEASED = ([1, 5, 1, 1], [70, 105, 33, 9])


@in_process
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-kv"])
def test_released_blocks_before_the_window_are_never_read(split: bool) -> None:
    """The reference and the kernel over a cache whose released blocks hold NaN give the reference's
    output over the clean cache."""
    batch = make_batch(*RELEASED, 4, 2, 32, 8, torch.float32, seed=27)
    released = _release_behind_windows(batch, 10)
    assert torch.isnan(released["v_cache"]).any()
    ref = reference.paged_attention(**batch, sliding_window=10)
    torch.testing.assert_close(reference.paged_attention(**released, sliding_window=10), ref)
    config = AttentionConfig(block_m=16, tile=16, num_segments=4 if split else 1)
    with poisoned_allocations():
        out = paged_attention_with_config(**released, config=config, sliding_window=10)
        default = impl.paged_attention(**released, sliding_window=10)  # tiles of 64
    assert rel_err(out, ref) < 1e-5
    assert rel_err(default, ref) < 1e-5


@in_process
@pytest.mark.parametrize("widen", [False, True], ids=["fp8-bytes", "fp8-widened"])
def test_released_blocks_before_the_window_are_never_read_from_fp8_caches(widen: bool) -> None:
    dtype = torch.float16 if widen else torch.float32
    batch = _fp8_batch(*RELEASED, torch.float8_e4m3fn, dtype, seed=28, scales="per-head")
    released = _release_behind_windows(batch, 20)
    ref = reference.paged_attention(**batch, sliding_window=20)
    config = AttentionConfig(block_m=16, tile=32, num_segments=1, fp8_widen=widen)  # tiles of 2 blocks
    with poisoned_allocations():
        out = paged_attention_with_config(**released, config=config, sliding_window=20)
    assert rel_err(out, ref) < (5e-3 if widen else 1e-5)


@in_process
def test_released_blocks_before_the_window_are_never_read_by_the_fused_decode() -> None:
    b = _batch(torch.float32, torch.float32, 2)
    cos_sin = build_cos_sin_cache(HEAD_DIM, 1024, 10000.0).to(DEVICE)
    q, k, v = b["qkv"].split(b["split"], dim=-1)
    n, window = q.shape[0], 12
    released = _release_behind_windows(b, window)  # the 151-key row: blocks 0-16 hold NaN
    assert torch.isnan(released["k_cache"]).any()
    args = (b["slot_mapping"], b["block_tables"], b["seq_lens"], b["query_start_loc"], 4096, HEAD_DIM**-0.5)
    ref = reference.decode_attention(
        b["positions"], q, k, v, cos_sin, HEAD_DIM, b["k_cache"].clone(), b["v_cache"].clone(), *args,
        None, None, window,
    )  # fmt: skip
    out = impl.decode_attention(
        b["positions"], q, k, v, cos_sin, HEAD_DIM, released["k_cache"], released["v_cache"], *args,
        None, None, window,
    )  # fmt: skip
    assert rel_err(out[: n - 1], ref[: n - 1]) < 1e-5


@in_process
@pytest.mark.parametrize("head_dim", [HEAD_DIM, 48], ids=lambda d: f"head{d}")
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-kv"])
def test_windowed_softcapped_fused_decode_equals_the_two_launches(
    split: bool, head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decode_attention (rotary, KV write and attention in one launch) with a window and a softcap: its
    output and caches bit for bit rotary_and_write_kv then paged_attention, and within rounding of the
    reference; split-KV forced (a window this small never splits by itself), so the new token's store
    and its read-back sit in the last of the window's segments."""
    plans = sys.modules["ops.triton.paged_attention"]
    if split:
        real = plans._decode_shape
        monkeypatch.setattr(
            plans, "_decode_shape", lambda *a: (*real(*a)[:2], 4, *real(*a)[3:])
        )  # 4 segments
    b = _batch(torch.float32, torch.float32, 4, head_dim)
    cos_sin = build_cos_sin_cache(head_dim, 1024, 10000.0).to(DEVICE)
    q, k, v = b["qkv"].split(b["split"], dim=-1)
    n, window, softcap, scale = q.shape[0], 12, 2.0, head_dim**-0.5
    args = (
        b["slot_mapping"],
        b["block_tables"],
        b["seq_lens"],
        b["query_start_loc"],
        4096,
        scale,
        None,
        None,
    )
    outs = []
    for op in ("ref", "separate", "fused"):
        kc, vc = b["k_cache"].clone(), b["v_cache"].clone()
        if op == "separate":
            q_rot = impl.rotary_and_write_kv(
                b["positions"], q, k, v, cos_sin, head_dim, kc, vc, b["slot_mapping"]
            )
            o = impl.paged_attention(
                q_rot.view(n, -1, head_dim), kc, vc, *args[1:4], 1, 4096, scale, None, None, window, softcap
            )
        else:
            fn = reference.decode_attention if op == "ref" else impl.decode_attention
            o = fn(b["positions"], q, k, v, cos_sin, head_dim, kc, vc, *args, window, softcap)
        outs.append((o[: n - 1], kc, vc))  # the last row is padding
    (o_ref, _, _), (o_sep, kc_sep, vc_sep), (o_got, kc_got, vc_got) = outs
    assert torch.equal(o_got, o_sep) and torch.equal(kc_got, kc_sep) and torch.equal(vc_got, vc_sep)
    assert rel_err(o_got, o_ref) < 1e-5
    plain = reference.decode_attention(
        b["positions"], q, k, v, cos_sin, head_dim, kc_sep.clone(), vc_sep.clone(), *args
    )
    assert rel_err(plain[: n - 1], o_ref) > 0.05


@in_process
def test_bad_window_and_softcap_are_refused() -> None:
    batch = make_batch(*DECODES, 4, 2, 32, 8, torch.float32, seed=25)
    with pytest.raises(ValueError, match="sliding_window must be >= 1; got 0"):
        impl.paged_attention(**batch, sliding_window=0)
    with pytest.raises(ValueError, match="softcap must be > 0; got -1.0"):
        impl.paged_attention(**batch, softcap=-1.0)
