"""The batched LoRA Triton kernels (shrink, expand) against their torch references, under
TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter), at small shapes: tokens of several
slots interleaved (a decode batch), runs of one slot (prefill segments), slot -1 rows that must stay
untouched, ragged sizes that exercise every mask, and a split of the input dimension."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import pytest
import torch

from ops import reference


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _inputs(num_tokens: int, in_features: int, out_features: int, lora_dim: int, num_slots: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, in_features, generator=gen)
    a = torch.randn(num_slots, lora_dim, in_features, generator=gen) * 0.1
    b = torch.randn(num_slots, out_features, lora_dim, generator=gen) * 0.1
    # interleaved slots, a run of one slot, and tokens without an adapter
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    slots[num_tokens // 2 :] = num_slots - 1
    if num_tokens > 1:
        slots[0] = -1
    y = torch.randn(num_tokens, out_features, generator=gen)
    return (t.to(DEVICE) for t in (x, a, b, slots.to(torch.int32), y))


@in_process
@pytest.mark.parametrize(
    ("num_tokens", "in_features", "out_features", "lora_dim", "num_slots"),
    [
        (1, 64, 48, 16, 1),  # batch-1 decode
        (7, 1100, 96, 48, 3),  # ragged; fused qkv at rank 16 (3 x 16); input split in chunks
        (37, 80, 200, 8, 4),  # several token tiles, ragged output tiles
        (300, 64, 96, 32, 3),  # a long batch: 64-token tiles
    ],
)
def test_lora_shrink_and_expand_match_the_reference(
    num_tokens: int, in_features: int, out_features: int, lora_dim: int, num_slots: int
) -> None:
    from ops.triton.lora import lora_expand, lora_shrink

    x, a, b, slots, y = _inputs(num_tokens, in_features, out_features, lora_dim, num_slots, num_tokens)
    t_ref = reference.lora_shrink(x, a, slots)
    t = lora_shrink(x, a, slots)
    rows = slots >= 0
    assert t.dtype == torch.float32 and t.shape == (num_tokens, lora_dim)
    torch.testing.assert_close(t[rows], t_ref[rows], rtol=1e-4, atol=1e-4)

    y_ref = reference.lora_expand(t_ref, b, slots, y.clone())
    y_out = y.clone()
    assert lora_expand(t_ref, b, slots, y_out) is y_out
    torch.testing.assert_close(y_out, y_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(y_out[~rows], y[~rows])  # no adapter: the base output is untouched
    assert not torch.equal(y_out[rows], y[rows])


@in_process
def test_lora_kernels_refuse_mismatched_shapes() -> None:
    from ops.triton.lora import lora_expand, lora_shrink

    x, a, b, slots, y = _inputs(4, 32, 16, 16, 2, 0)
    with pytest.raises(ValueError, match=r"lora_shrink: x \(4, 32\), A \(2, 16, 16\)"):
        lora_shrink(x, a[:, :, :16], slots)
    with pytest.raises(ValueError, match=r"lora_expand: t \(4, 16\), B \(2, 16, 16\), y \(4, 8\)"):
        lora_expand(torch.zeros(4, 16, device=DEVICE), b, slots, y[:, :8])


@in_process
def test_lora_kernels_leave_tokens_without_an_adapter_alone() -> None:
    """A batch of base-model tokens only (every slot -1), as a CUDA graph replays for base requests."""
    from ops.triton.lora import lora_expand, lora_shrink

    x, a, b, slots, y = _inputs(20, 32, 40, 16, 2, 3)
    slots = torch.full_like(slots, -1)
    y_out = y.clone()
    lora_expand(lora_shrink(x, a, slots), b, slots, y_out)
    assert torch.equal(y_out, y)
