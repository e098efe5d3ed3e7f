"""The one-launch LoRA kernel (ops/triton/lora_fused.py) against the torch reference (shrink then
expand), under TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter): decode-sized batches of
mixed slots with rows without an adapter, ranks zero-padded to max_lora_rank, plain layers and fused
q/k/v (GQA-sized, tiles straddling sub-matrices) and gate/up with garbage off B's diagonal blocks,
ragged input and output sizes; and `lora_apply`'s choice between it and the shrink/expand pair."""

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


def _layer(
    num_tokens: int,
    in_features: int,
    sizes: tuple[int, ...],  # output rows of each sub-matrix (q/k/v: 3, gate/up: 2, plain: 1)
    ranks: tuple[int, ...],  # each slot's adapter rank, zero-padded to max_rank
    max_rank: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
):
    """Stacked slots as the engine lays them out (engine.lora.layers): A [slots, subs x max_rank, in],
    B block-diagonal [slots, out, subs x max_rank] with each slot's rank zero-padded. Returns x, A,
    B (zeros off the diagonal blocks), B with garbage there, slots, y and the sub-matrices' offsets."""
    gen = torch.Generator().manual_seed(seed)
    num_slots, subs = len(ranks), len(sizes)
    offsets = [sum(sizes[:i]) for i in range(subs)]
    a = torch.zeros(num_slots, subs * max_rank, in_features)
    b = torch.zeros(num_slots, sum(sizes), subs * max_rank)
    for s, r in enumerate(ranks):
        for i, (start, rows) in enumerate(zip(offsets, sizes, strict=True)):
            a[s, i * max_rank : i * max_rank + r] = torch.randn(r, in_features, generator=gen) * 0.1
            b[s, start : start + rows, i * max_rank : i * max_rank + r] = (
                torch.randn(rows, r, generator=gen) * 0.1
            )
    garbage = b + (b == 0) * torch.randn(b.shape, generator=gen) * 1e3  # where the slots hold zeros
    x = torch.randn(num_tokens, in_features, generator=gen)
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).to(torch.int32)
    slots[0] = num_slots - 1  # at least one row with an adapter
    if num_tokens > 1:
        slots[1] = -1  # and one without
    y = torch.randn(num_tokens, sum(sizes), generator=gen)
    x, a, b, garbage, y = (t.to(dtype) for t in (x, a, b, garbage, y))
    return (*(t.to(DEVICE) for t in (x, a, b, garbage, slots, y)), offsets)


@in_process
@pytest.mark.parametrize("num_tokens", [1, 2, 3])
@pytest.mark.parametrize(
    ("in_features", "sizes", "ranks", "max_rank"),
    [
        (100, (200,), (8, 16, 3), 16),  # a plain layer: ragged input and output tiles, ranks padded to 16
        (96, (64, 16, 16), (16, 8), 16),  # fused q/k/v with GQA's short k and v: one tile meets all three
        (300, (136, 136), (64, 8), 64),  # gate/up at rank 64: an output tile straddles gate and up
        (64, (256, 64, 64), (4, 16), 16),  # q/k/v: q alone in tiles 0-1, k and v together in tile 2
    ],
)
def test_lora_fused_matches_the_reference(
    num_tokens: int, in_features: int, sizes: tuple, ranks: tuple, max_rank: int
) -> None:
    from ops.triton.lora_fused import lora_fused

    x, a, b, garbage, slots, y, offsets = _layer(num_tokens, in_features, sizes, ranks, max_rank, num_tokens)
    y_ref = reference.lora_apply(x, a, b, slots, y.clone(), offsets)
    y_out = y.clone()
    assert lora_fused(x, a, garbage, slots, y_out, offsets) is y_out
    torch.testing.assert_close(y_out, y_ref, rtol=1e-4, atol=1e-4)
    rows = slots >= 0
    assert torch.equal(y_out[~rows], y[~rows])  # no adapter: the base output is untouched, bit for bit
    assert (y_out[rows] - y[rows]).abs().min(dim=1).values.gt(0).all()  # every output row of an adapter


@in_process
def test_lora_fused_rounds_the_shrink_to_the_model_dtype_as_peft_does() -> None:
    """16-bit weights: x @ A^T is rounded to B's dtype before B (PEFT's lora_A output is in the model
    dtype), so the result equals the reference's (which rounds) and not an unrounded fp32 product.
    fp16 here: the interpreter runs fp16 through numpy, not bf16 (the pair's kernels fail there too)."""
    from ops.triton.lora_fused import lora_fused

    x, a, b, garbage, slots, y, offsets = _layer(3, 160, (64, 16, 16), (16, 8), 16, 5, torch.float16)
    x = x * 37  # a shrink output far from fp16's grid
    y = torch.zeros_like(y)  # the delta itself, not drowned in y
    y_ref = reference.lora_apply(x, a, b, slots, y.clone(), offsets)
    y_out = lora_fused(x, a, garbage, slots, y.clone(), offsets)
    torch.testing.assert_close(y_out.float(), y_ref.float(), rtol=1e-3, atol=1e-3)
    unrounded = torch.zeros_like(y_ref, dtype=torch.float32)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            unrounded[i] = (x[i].float() @ a[s].float().t()) @ b[s].float().t()
    assert (y_out.float() - unrounded).abs().max() > (y_out.float() - y_ref.float()).abs().max()


@in_process
def test_lora_fused_serves_several_token_tiles() -> None:
    """Correct past one 16-token tile too (lora_apply sends such batches to the pair)."""
    from ops.triton.lora_fused import lora_fused

    x, a, b, garbage, slots, y, offsets = _layer(37, 80, (100, 100), (8, 16, 4), 16, 9)
    y_ref = reference.lora_apply(x, a, b, slots, y.clone(), offsets)
    torch.testing.assert_close(
        lora_fused(x, a, garbage, slots, y.clone(), offsets), y_ref, rtol=1e-4, atol=1e-4
    )


@in_process
def test_lora_fused_leaves_a_batch_without_adapters_alone() -> None:
    """Every slot -1 (a graph of the LoRA variant padded with base-model rows only): y bit for bit."""
    from ops.triton.lora_fused import lora_fused

    x, a, b, garbage, slots, y, offsets = _layer(4, 64, (48, 16, 16), (8,), 16, 2)
    y_out = lora_fused(x, a, garbage, torch.full_like(slots, -1), y.clone(), offsets)
    assert torch.equal(y_out, y)


@in_process
@pytest.mark.parametrize("num_tokens", [8, 9])
def test_lora_apply_takes_one_launch_up_to_the_threshold(
    num_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to FUSED_MAX_TOKENS tokens: the fused kernel alone (the pair is never called); above it the
    shrink/expand pair (the fused kernel is never called). Both give the reference's result."""
    import ops.triton.lora_fused as fused

    assert fused.FUSED_MAX_TOKENS == 8
    launched: list[str] = []
    for name in ("lora_fused", "lora_shrink", "lora_expand"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *args, _n=name, _f=real: launched.append(_n) or _f(*args))
    x, a, b, garbage, slots, y, offsets = _layer(num_tokens, 70, (64, 16, 16), (16, 4), 16, 4)
    y_ref = reference.lora_apply(x, a, b, slots, y.clone(), offsets)
    y_out = fused.lora_apply(x, a, garbage, slots, y.clone(), offsets)
    torch.testing.assert_close(y_out, y_ref, rtol=1e-4, atol=1e-4)
    assert launched == (["lora_fused"] if num_tokens <= 8 else ["lora_shrink", "lora_expand"])


@in_process
def test_lora_fused_refuses_mismatched_shapes() -> None:
    from ops.triton.lora_fused import lora_fused

    x, a, b, _, slots, y, offsets = _layer(2, 32, (16, 8, 8), (4,), 4, 0)
    with pytest.raises(ValueError, match=r"lora_fused: x \(2, 32\), A \(1, 12, 16\), B \(1, 32, 12\)"):
        lora_fused(x, a[:, :, :16], b, slots, y, offsets)
    with pytest.raises(ValueError, match=r"lora_fused: slice_offsets \(0, 16, 24, 28\) for lora_dim 12"):
        lora_fused(x, a, b, slots, y, [0, 16, 24, 28])
