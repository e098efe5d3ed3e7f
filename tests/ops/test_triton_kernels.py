"""Every Triton kernel in ops/triton against its torch reference in ops/reference.py.

Without a GPU the kernels run under the Triton interpreter. TRITON_INTERPRET must be set before triton
itself is first imported (triton.language's own jit helpers such as tl.sum are decorated then), so it is
set here above every import that could pull triton in. If something in this pytest process imported
triton earlier without it, the kernels cannot be interpreted here: then this module's tests are skipped
in-process and `test_in_fresh_interpreter_process` reruns the whole module in a subprocess with the
variable set (and fails if that run fails).
Under the interpreter `tl.dot` on bf16 is wrong, so inputs are fp32/fp16. Every output is poisoned (NaN)
before the kernel runs, so an unwritten element fails the comparison.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton imported earlier in this process in compiled mode, on a machine without a GPU
TRITON_UNUSABLE_HERE = (
    DEVICE == "cpu" and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
)
if DEVICE == "cpu" and not TRITON_UNUSABLE_HERE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ops  # noqa: E402
import ops.triton as impl  # noqa: E402
from ops import reference  # noqa: E402
from ops.triton.paged_attention import AttentionConfig, paged_attention_with_config  # noqa: E402

in_process = pytest.mark.skipif(
    TRITON_UNUSABLE_HERE, reason="triton was imported before TRITON_INTERPRET: run in a subprocess instead"
)


@pytest.mark.skipif(not TRITON_UNUSABLE_HERE, reason="the kernels run in this process")
def test_in_fresh_interpreter_process() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]


@contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Fill every float tensor that torch.empty / empty_like hands out with NaN while the kernel runs."""
    orig_empty, orig_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(orig_empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: poison(orig_empty_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = orig_empty, orig_empty_like


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any(), "NaN in output: an element was not written"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


@in_process
def test_use_triton_routes_every_op() -> None:
    try:
        ops.use_triton(True)
        for name in ("rms_norm", "rotary_embedding", "silu_and_mul", "write_kv_cache", "paged_attention"):
            assert getattr(ops, name) is getattr(impl, name)
    finally:
        ops.use_triton(False)
    assert ops.paged_attention is reference.paged_attention


# ---------------------------------------------------------------- elementwise / row kernels


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, with_residual: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 96, dtype=dtype, device=DEVICE) * 3  # 96: not a power of two, exercises the mask
    weight = (torch.rand(96, device=DEVICE) + 0.5).to(dtype)
    residual = torch.randn(5, 96, dtype=dtype, device=DEVICE) if with_residual else None
    ref = reference.rms_norm(x, weight, 1e-6, residual)
    with poisoned_allocations():
        out = impl.rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        assert isinstance(out, tuple) and isinstance(ref, tuple)
        assert rel_err(out[0], ref[0]) < TOL[dtype]
        assert rel_err(out[1], ref[1]) < TOL[dtype]
    else:
        assert isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)
        assert rel_err(out, ref) < TOL[dtype]


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = (torch.randn(7, 2 * 48, device=DEVICE) * 3).to(dtype)
    ref = reference.silu_and_mul(x)
    with poisoned_allocations():
        out = impl.silu_and_mul(x)
    assert rel_err(out, ref) < TOL[dtype]


def llama3_cos_sin_cache(head_dim: int, max_position: int, base: float = 500000.0) -> torch.Tensor:
    """cos | sin rows with llama3 rope scaling baked in (factor 8, low 1, high 4, original 8192)."""
    factor, low_freq_factor, high_freq_factor, original = 8.0, 1.0, 4.0, 8192
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low_freq_factor, original / high_freq_factor
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    assert not torch.equal(scaled, inv_freq)  # the scaling really changes the cache
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), scaled)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_embedding_llama3_scaled(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    head_dim, num_heads, num_kv_heads, num_tokens = 32, 4, 2, 6
    cache = llama3_cos_sin_cache(head_dim, 20000).to(DEVICE)
    positions = torch.tensor([0, 1, 7, 300, 9000, 19999], device=DEVICE)
    # q and k as views into one fused qkv buffer, as the model passes them (row stride != width)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    ref_q, ref_k = reference.rotary_embedding(positions, q, k, cache, head_dim)
    with poisoned_allocations():
        out_q, out_k = impl.rotary_embedding(positions, q, k, cache, head_dim)
    assert out_q.shape == q.shape and out_k.shape == k.shape
    assert rel_err(out_q, ref_q) < TOL[dtype]
    assert rel_err(out_k, ref_k) < TOL[dtype]


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_cache_skips_padding_slots(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 8, 2, 16
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), 1234.0, dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, -777.0)
    key = torch.randn(7, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    value = torch.randn(7, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    slot_mapping = torch.tensor([3, 17, -1, 40, 41, -1, 47], dtype=torch.int64, device=DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, ref_k, ref_v, slot_mapping)
    impl.write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, ref_k)
    assert torch.equal(v_cache, ref_v)
    assert (k_cache.view(-1, num_kv_heads, head_dim)[[0, 1, 2, 4, 5, 46]] == 1234.0).all()


# ---------------------------------------------------------------- paged attention


def make_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
) -> dict:
    """A paged batch with shuffled physical blocks, random data in every cache slot (including slots
    no sequence owns) and garbage in unused block-table entries."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 2
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((len(seq_lens), max_blocks), 10**6, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = perm[used : used + n].int()
        used += n
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    q_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return {
        "query": torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(dtype).to(DEVICE),
        "k_cache": torch.randn(cache_shape, generator=g).to(dtype).to(DEVICE),
        "v_cache": torch.randn(cache_shape, generator=g).to(dtype).to(DEVICE),
        "block_tables": block_tables.to(DEVICE),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        "query_start_loc": q_start.to(DEVICE),
        "max_query_len": max(q_lens),
        "max_seq_len": max(seq_lens),
        "scale": head_dim**-0.5,
    }


# 2 prefills with cached prefixes of 7 and 20 tokens, then 3 decodes (one with a context of 1).
MIXED = ([6, 11, 1, 1, 1], [13, 31, 1, 18, 40])
DECODES = ([1, 1, 1], [9, 70, 33])


def check_attention(batch: dict, config: AttentionConfig | None, dtype: torch.dtype) -> None:
    ref = reference.paged_attention(**batch)
    with poisoned_allocations():
        out = paged_attention_with_config(**batch, config=config)
    assert rel_err(out, ref) < TOL[dtype]


@in_process
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size", "dtype"),
    [
        (2, 2, 16, 8, torch.float32),  # MHA (group 1), tiny llama's head_dim
        (4, 2, 32, 16, torch.float16),  # group 2, tiny qwen3's head_dim
        (8, 2, 64, 8, torch.float16),  # group 4
        (4, 1, 32, 8, torch.float32),  # group 4, one KV head
        (6, 2, 16, 16, torch.float16),  # group 3: not a power of two
    ],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-kv"])
def test_paged_attention_mixed_batch(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, split: bool
) -> None:
    batch = make_batch(
        *MIXED, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=num_heads + head_dim
    )
    # block_m 16 puts several query blocks in each prefill; tile 16 spans 1 or 2 cache blocks.
    config = AttentionConfig(block_m=16, tile=16, num_segments=4 if split else 1)
    check_attention(batch, config, dtype)


@in_process
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-kv"])
def test_paged_attention_decode_batch(split: bool) -> None:
    batch = make_batch(*DECODES, 8, 2, 32, 16, torch.float16, seed=5)
    config = AttentionConfig(block_m=16, tile=32, num_segments=8 if split else 1)
    check_attention(batch, config, torch.float16)


@in_process
def test_paged_attention_default_config() -> None:
    """The public entry point with its own heuristic, on the mixed batch and on a decode-only batch."""
    for q_lens, seq_lens in (MIXED, DECODES):
        batch = make_batch(q_lens, seq_lens, 4, 2, 32, 16, torch.float32, seed=6)
        ref = reference.paged_attention(**batch)
        with poisoned_allocations():
            out = impl.paged_attention(**batch)
        assert rel_err(out, ref) < TOL[torch.float32]
