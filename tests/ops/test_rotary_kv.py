"""The fused rotary + KV-write kernel (ops/triton/rotary_kv.py) against its spec, ops.reference's
rotary_embedding followed by write_kv_cache, under TRITON_INTERPRET=1 without a GPU
(tests.ops.triton_interpreter): the rotated query and both caches equal the two separate ops' bit for bit,
with q/k/v as views into one fused qkv buffer (as the model passes them), padding slots (-1) that must
store nothing, caches in the model dtype and in both fp8 formats with per-head scales, partial
rotary (Phi-3: a cos/sin cache 20 of 32 dims wide, a half of 10 that is not a power of two), and heads
that are not a power of two (Phi-3-mini's 96, and 48: padded lanes, ops/triton/head_dim.py)."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch

import ops.triton as impl
from engine.model.layers.rotary import build_cos_sin_cache
from ops import reference


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _sentinel_cache(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A cache whose untouched slots hold a recognisable non-zero byte pattern (0x11 in every byte)."""
    *lead, last = shape
    return torch.full((*lead, last * dtype.itemsize), 0x11, dtype=torch.uint8, device=DEVICE).view(dtype)


CASES = {  # (model dtype, cache dtype, rotary_dim, head_dim)
    "bf16 cache": (torch.bfloat16, torch.bfloat16, 32, 32),
    "fp32 cache": (torch.float32, torch.float32, 32, 32),
    "e4m3 cache": (torch.float16, torch.float8_e4m3fn, 32, 32),
    "e5m2 cache": (torch.float16, torch.float8_e5m2, 32, 32),
    "fp32 cache partial rotary": (torch.float32, torch.float32, 20, 32),
    "e4m3 cache partial rotary": (torch.float16, torch.float8_e4m3fn, 20, 32),
    "bf16 cache head 96": (torch.bfloat16, torch.bfloat16, 96, 96),
    "e5m2 cache head 48": (torch.float16, torch.float8_e5m2, 48, 48),
    "e4m3 cache head 48 partial rotary": (torch.float16, torch.float8_e4m3fn, 20, 48),
}


@in_process
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fused_rotary_kv_write_equals_rotary_then_write(case: str) -> None:
    dtype, cache_dtype, rotary_dim, head_dim = CASES[case]
    num_heads, num_kv_heads, block_size, num_blocks = 4, 2, 8, 5
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    g = torch.Generator().manual_seed(7)
    num_tokens = 6
    # One fused buffer [tokens, q | k | v], split into views as the model does.
    qkv = (torch.randn(num_tokens, q_size + 2 * kv_size, generator=g) * 3).to(dtype).to(DEVICE)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    positions = torch.tensor([0, 5, 17, 300, 301, 0], dtype=torch.int64, device=DEVICE)
    slot_mapping = torch.tensor([3, 9, -1, 38, 39, -1], dtype=torch.int64, device=DEVICE)
    cos_sin = build_cos_sin_cache(rotary_dim, 512, 10000.0).to(DEVICE)  # [512, rotary_dim]
    fp8 = cache_dtype.itemsize == 1
    # per-head scales orders of magnitude apart: a kernel using one head's scale for another fails
    k_scale = torch.tensor([0.5, 20.0], device=DEVICE) if fp8 else None
    v_scale = torch.tensor([3.0, 0.01], device=DEVICE) if fp8 else None
    shape = (num_blocks, block_size, num_kv_heads, head_dim)

    def separate(positions, q, k, v, cos_sin, head_dim, k_cache, v_cache, slots, k_scale, v_scale):  # noqa: ANN001, ANN202
        """The two Triton launches the fused one replaces, as the model ran them before."""
        q_rot, k_rot = impl.rotary_embedding(positions, q, k, cos_sin, head_dim)
        n = k_rot.shape[0]
        impl.write_kv_cache(k_rot.view(n, -1, head_dim), v.reshape(n, -1, head_dim), k_cache, v_cache, slots,
                            k_scale, v_scale)  # fmt: skip
        return q_rot

    out = {}
    for name, op in (
        ("ref", reference.rotary_and_write_kv),
        ("separate", separate),
        ("triton", impl.rotary_and_write_kv),
    ):
        k_cache, v_cache = _sentinel_cache(shape, cache_dtype), _sentinel_cache(shape, cache_dtype)
        q_rot = op(positions, q, k, v, cos_sin, head_dim, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        out[name] = (q_rot, k_cache, v_cache)
    (q_ref, kc_ref, vc_ref), (q_got, kc_got, vc_got) = out["ref"], out["triton"]
    q_sep, kc_sep, vc_sep = out["separate"]
    assert q_got.shape == (num_tokens, q_size) and q_got.dtype == dtype
    # Bit for bit the two launches it replaces (the model's outputs do not move) ...
    assert torch.equal(q_got, q_sep)
    assert torch.equal(kc_got.view(torch.uint8), kc_sep.view(torch.uint8))
    assert torch.equal(vc_got.view(torch.uint8), vc_sep.view(torch.uint8))
    # ... and the spec's within a rounding of the model dtype (the float32 rotation's last bit may
    # differ from torch's CPU kernels, then round to a neighbouring 16-bit value).
    assert torch.allclose(
        q_got.float(), q_ref.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-5
    )
    # The cache slots of padding (and of no token) untouched, K and V alike.
    written = {3, 9, 38, 39}
    untouched = [s for s in range(num_blocks * block_size) if s not in written]
    for cache in (kc_got, vc_got):
        flat = cache.view(torch.uint8).view(num_blocks * block_size, -1)
        assert bool((flat[untouched] == 0x11).all()) and not bool((flat[sorted(written)] == 0x11).all())
    if fp8:  # fp8 bytes agree with the spec's only where the rotated 16-bit keys do (checked above)
        return
    for ref, got in ((kc_ref, kc_got), (vc_ref, vc_got)):
        assert torch.allclose(
            got.float(), ref.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-5
        )
    # The spec itself: q and the stored k rotated as rotary_embedding does, v stored as given.
    q_rot, k_rot = reference.rotary_embedding(positions, q, k, cos_sin, head_dim)
    assert torch.equal(q_ref, q_rot)
    assert torch.equal(kc_ref.view(-1, num_kv_heads, head_dim)[9], k_rot[1].view(num_kv_heads, head_dim))
    assert torch.equal(vc_ref.view(-1, num_kv_heads, head_dim)[38], v[3].reshape(num_kv_heads, head_dim))
    # Past rotary_dim, q and k come back (and k is stored) exactly as given.
    assert torch.equal(
        q_got.view(num_tokens, num_heads, head_dim)[..., rotary_dim:],
        q.reshape(num_tokens, num_heads, head_dim)[..., rotary_dim:],
    )
    stored_k = kc_got.view(-1, num_kv_heads, head_dim)[9]
    assert torch.equal(stored_k[:, rotary_dim:], k[1].reshape(num_kv_heads, head_dim)[:, rotary_dim:])


@in_process
def test_fused_rotary_kv_write_refuses_a_cache_of_another_layout() -> None:
    cos_sin = build_cos_sin_cache(32, 64, 10000.0).to(DEVICE)
    q = torch.zeros(1, 128, device=DEVICE)
    k = v = torch.zeros(1, 64, device=DEVICE)
    cache = torch.zeros(2, 8, 4, 16, device=DEVICE)  # [blocks, block_size, 4 heads, 16]: not [2, 32]
    slots = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"must be contiguous \[blocks, block_size, 2, 32\]"):
        impl.rotary_and_write_kv(torch.zeros(1, dtype=torch.int64, device=DEVICE), q, k, v, cos_sin, 32,
                                 cache, cache, slots)  # fmt: skip
