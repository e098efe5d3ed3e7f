"""decode_attention (ops/triton/paged_attention.py: rotary, the KV write and paged attention of a decode
batch in one launch) under TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter): its output
and both caches equal, bit for bit, the two launches it replaces (rotary_and_write_kv, then
paged_attention), and its output is within rounding of the spec (ops.reference.decode_attention).
Cases: q/k/v as views into one fused qkv buffer (as the model passes them), sequences whose new token
opens a fresh block, lies mid-block or ends one, padding rows (slot -1) that must store nothing, a
split-KV launch (max_seq_len past 512: several segments, the new token in the last one), GQA groups
of 4 and 1, caches in the model dtype and both fp8 formats with per-head scales, heads of 32 and of
48 and 96 (not powers of two: padded lanes, ops/triton/head_dim.py)."""

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


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


CASES = {  # (model dtype, cache dtype, group, max_seq_len, rotary_dim[, head_dim: HEAD_DIM])
    # (no bf16: the interpreter's bf16 dot is not a number, for paged_attention as for this)
    "fp16 group 4": (torch.float16, torch.float16, 4, 512, 32),
    "fp16 group 4 split": (torch.float16, torch.float16, 4, 4096, 32),
    "fp32 group 1": (torch.float32, torch.float32, 1, 512, 32),
    "e4m3 group 4 split": (torch.float16, torch.float8_e4m3fn, 4, 4096, 32),
    "e5m2 group 1": (torch.float16, torch.float8_e5m2, 1, 512, 32),
    # Phi-3's partial rotary: 20 of 32 dims rotate (a half of 10, not a power of two)
    "fp32 group 1 partial rotary": (torch.float32, torch.float32, 1, 512, 20),
    "e4m3 group 4 split partial rotary": (torch.float16, torch.float8_e4m3fn, 4, 4096, 20),
    # heads that are not a power of two: Phi-3-mini's 96, and 48 over an fp8 cache with partial rotary
    "fp32 group 1 head 96": (torch.float32, torch.float32, 1, 512, 96, 96),
    "e4m3 group 4 split head 48": (torch.float16, torch.float8_e4m3fn, 4, 4096, 48, 48),
    "e5m2 group 1 head 48 partial rotary": (torch.float16, torch.float8_e5m2, 1, 512, 20, 48),
    "fp16 group 4 split head 40": (torch.float16, torch.float16, 4, 4096, 40, 40),  # a multiple of 8, not 16
}

HEAD_DIM, NUM_KV_HEADS, BLOCK_SIZE, NUM_BLOCKS = 32, 2, 8, 48


def _batch(dtype: torch.dtype, cache_dtype: torch.dtype, group: int, head_dim: int = HEAD_DIM) -> dict:
    """Four real sequences (contexts 1, 9, 16 and 150 before this step) and one padding row, with
    caches holding random earlier context and distinct, shuffled blocks per sequence."""
    g = torch.Generator().manual_seed(11)
    num_heads = NUM_KV_HEADS * group
    q_size, kv_size = num_heads * head_dim, NUM_KV_HEADS * head_dim
    seq_lens = [2, 10, 17, 151, 1]  # including this step's token; the last row is padding
    num_seqs = len(seq_lens)
    qkv = (torch.randn(num_seqs, q_size + 2 * kv_size, generator=g) * 2).to(dtype)
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, head_dim)
    k_cache = (torch.randn(shape, generator=g)).to(cache_dtype)
    v_cache = (torch.randn(shape, generator=g)).to(cache_dtype)
    width = (max(seq_lens) + BLOCK_SIZE - 1) // BLOCK_SIZE
    perm = torch.randperm(NUM_BLOCKS - 1, generator=g) + 1  # block 0 stays the padding row's
    block_tables = torch.zeros(num_seqs, width, dtype=torch.int32)
    slots, used = [], 0
    for i, n in enumerate(seq_lens[:-1]):
        blocks = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
        block_tables[i, :blocks] = perm[used : used + blocks].to(torch.int32)
        used += blocks
        pos = n - 1
        slots.append(int(block_tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
    positions = torch.tensor([n - 1 for n in seq_lens[:-1]] + [0], dtype=torch.int64)
    fp8 = cache_dtype.itemsize == 1
    return {
        "qkv": qkv.to(DEVICE),
        "split": [q_size, kv_size, kv_size],
        "positions": positions.to(DEVICE),
        "slot_mapping": torch.tensor([*slots, -1], dtype=torch.int64, device=DEVICE),
        "k_cache": k_cache.to(DEVICE),
        "v_cache": v_cache.to(DEVICE),
        "block_tables": block_tables.to(DEVICE),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        "query_start_loc": torch.arange(num_seqs + 1, dtype=torch.int32, device=DEVICE),
        # per-head scales far apart: a kernel using one head's scale for another fails
        "k_scale": torch.tensor([0.5, 4.0], device=DEVICE) if fp8 else None,
        "v_scale": torch.tensor([2.0, 0.25], device=DEVICE) if fp8 else None,
    }


@in_process
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_decode_attention_equals_rotary_write_then_attention(case: str) -> None:
    dtype, cache_dtype, group, max_seq_len, rotary_dim, *rest = CASES[case]
    head_dim = rest[0] if rest else HEAD_DIM
    b = _batch(dtype, cache_dtype, group, head_dim)
    cos_sin = build_cos_sin_cache(rotary_dim, 1024, 10000.0).to(DEVICE)  # [1024, rotary_dim]
    q, k, v = b["qkv"].split(b["split"], dim=-1)
    scale = head_dim**-0.5
    n = q.shape[0]

    def separate(
        positions, q, k, v, cos_sin, head_dim, kc, vc, slots, bt, sl, qsl, max_seq_len, scale, ks, vs
    ):  # noqa: ANN001, ANN202, PLR0913
        """The two Triton launches the fused one replaces, as the model ran them before."""
        q_rot = impl.rotary_and_write_kv(positions, q, k, v, cos_sin, head_dim, kc, vc, slots, ks, vs)
        return impl.paged_attention(
            q_rot.view(n, -1, head_dim), kc, vc, bt, sl, qsl, 1, max_seq_len, scale, ks, vs
        )

    out = {}
    for name, op in (
        ("ref", reference.decode_attention),
        ("separate", separate),
        ("fused", impl.decode_attention),
    ):
        kc, vc = b["k_cache"].clone(), b["v_cache"].clone()
        o = op(
            b["positions"], q, k, v, cos_sin, head_dim, kc, vc, b["slot_mapping"], b["block_tables"],
            b["seq_lens"], b["query_start_loc"], max_seq_len, scale, b["k_scale"], b["v_scale"],
        )  # fmt: skip
        out[name] = (o, kc, vc)
    (o_ref, kc_ref, vc_ref), (o_sep, kc_sep, vc_sep), (o_got, kc_got, vc_got) = (
        out["ref"],
        out["separate"],
        out["fused"],
    )
    assert o_got.shape == (n, NUM_KV_HEADS * group, head_dim) and o_got.dtype == dtype
    # Bit for bit the launches it replaces: the model's tokens do not move.
    assert torch.equal(kc_got.view(torch.uint8), kc_sep.view(torch.uint8))
    assert torch.equal(vc_got.view(torch.uint8), vc_sep.view(torch.uint8))
    real = slice(0, n - 1)  # the padding row attends to whatever block 0 holds: only its stores matter
    assert torch.equal(o_got[real], o_sep[real])
    # Only the real tokens' slots changed (the padding row stored nothing).
    changed = (kc_got.view(torch.uint8) != b["k_cache"].view(torch.uint8)).reshape(
        NUM_BLOCKS * BLOCK_SIZE, -1
    )
    assert sorted(changed.any(dim=1).nonzero().flatten().tolist()) == sorted(b["slot_mapping"][real].tolist())
    # The spec, within the rounding of the model dtype (its float32 softmax in another order).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(o_got[real].float(), o_ref[real].float(), rtol=tol, atol=tol)
    if (
        cache_dtype.itemsize != 1
    ):  # fp8 bytes follow the rotated 16-bit keys, compared with the launches above
        assert torch.allclose(kc_got.float(), kc_ref.float(), rtol=tol, atol=tol)
        assert torch.equal(vc_got, vc_ref)  # values are stored as given


@in_process
def test_decode_attention_refuses_a_cache_of_another_layout() -> None:
    cos_sin = build_cos_sin_cache(32, 64, 10000.0).to(DEVICE)
    q = torch.zeros(1, 128, device=DEVICE)
    k = v = torch.zeros(1, 64, device=DEVICE)
    cache = torch.zeros(2, 8, 4, 16, device=DEVICE)  # [blocks, block_size, 4 heads, 16]: not [2, 32]
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"must be contiguous \[blocks, block_size, 2, 32\]"):
        impl.decode_attention(
            torch.zeros(1, dtype=torch.int64, device=DEVICE), q, k, v, cos_sin, 32, cache, cache,
            torch.zeros(1, dtype=torch.int64, device=DEVICE), one.view(1, 1) * 0, one, torch.arange(2, device=DEVICE,
            dtype=torch.int32), 1, 1.0,
        )  # fmt: skip


@in_process
@pytest.mark.parametrize("case", ["e4m3 group 4 split", "e5m2 group 1", "e4m3 group 4 split head 48"])
def test_decode_attention_over_a_widened_fp8_cache_is_bit_for_bit_the_bytes_path(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WEIR_FP8_KV_WIDEN=1 (ops/triton/fp8_kv_read.py): the program that stores this step's fp8 K/V reads
    it back, with the rest of the tile, as words widened to float16; with float16 queries outputs and
    caches are the bytes path's bit for bit (the bytes path launched in the widened path's shape)."""
    dtype, cache_dtype, group, max_seq_len, rotary_dim, *rest = CASES[case]
    head_dim = rest[0] if rest else HEAD_DIM
    b = _batch(dtype, cache_dtype, group, head_dim)
    cos_sin = build_cos_sin_cache(rotary_dim, 1024, 10000.0).to(DEVICE)  # [1024, rotary_dim]
    q, k, v = b["qkv"].split(b["split"], dim=-1)
    plans = sys.modules["ops.triton.paged_attention"]
    runs = []
    for widen in ("0", "1"):
        monkeypatch.setenv("WEIR_FP8_KV_WIDEN", widen)
        monkeypatch.setattr(plans, "_PLANS", {})
        if widen == "0":  # the widened path's tiles and segments, so only the read differs
            monkeypatch.setattr(
                plans, "_decode_shape", lambda plan, _w, *a, f=plans._decode_shape: f(plan, True, *a)
            )
        else:
            monkeypatch.undo()
            monkeypatch.setenv("WEIR_FP8_KV_WIDEN", widen)
            monkeypatch.setattr(plans, "_PLANS", {})
        kc, vc = b["k_cache"].clone(), b["v_cache"].clone()
        o = impl.decode_attention(
            b["positions"], q, k, v, cos_sin, head_dim, kc, vc, b["slot_mapping"], b["block_tables"],
            b["seq_lens"], b["query_start_loc"], max_seq_len, head_dim**-0.5, b["k_scale"], b["v_scale"],
        )  # fmt: skip
        assert all(plan.fp8_widen == (widen == "1") for plan in plans._PLANS.values())
        runs.append((o, kc.view(torch.uint8), vc.view(torch.uint8)))
    real = slice(0, q.shape[0] - 1)
    assert torch.equal(runs[1][0][real], runs[0][0][real])
    assert torch.equal(runs[1][1], runs[0][1]) and torch.equal(runs[1][2], runs[0][2])
