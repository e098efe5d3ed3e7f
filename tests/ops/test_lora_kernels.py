"""The batched LoRA Triton kernels (shrink, expand) against their torch references, under
TRITON_INTERPRET=1 without a GPU (tests.ops.triton_interpreter), at small shapes: tokens of several
slots interleaved (a decode batch), runs of one slot (prefill segments), slot -1 rows that must stay
untouched, ragged sizes that exercise every mask, and a split of the input dimension."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import DEVICE, in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import json
from pathlib import Path

import numpy as np
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
    t = lora_shrink(x, a, slots)  # [split, num_tokens, lora_dim]: partial products over in_features
    rows = slots >= 0
    assert t.dtype == torch.float32 and t.shape[1:] == (num_tokens, lora_dim)
    torch.testing.assert_close(t.sum(0), t_ref, rtol=1e-4, atol=1e-4)  # rows without an adapter: 0

    y_ref = reference.lora_expand(t_ref, b, slots, y.clone())
    for t_in in (t_ref, t):  # a whole t, and the shrink's partials summed by the expand
        y_out = y.clone()
        assert lora_expand(t_in, b, slots, y_out) is y_out
        torch.testing.assert_close(y_out, y_ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(y_out[~rows], y[~rows])  # no adapter: the base output is untouched
        assert not torch.equal(y_out[rows], y[rows])


@in_process
@pytest.mark.parametrize(("num_tokens", "in_features"), [(1, 2048), (5, 1100), (40, 64)])
def test_lora_shrink_writes_every_element_of_its_uninitialized_output(
    num_tokens: int, in_features: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shrink's output comes from torch.empty (no memset launch): every partial of every split,
    rows without an adapter included, must be written by the kernel. Here empty memory is NaN."""
    import ops.triton.lora as lora

    real_empty = torch.empty

    def nan_empty(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    x, a, b, slots, y = _inputs(num_tokens, in_features, 32, 16, 3, 11)
    monkeypatch.setattr(lora.torch, "empty", nan_empty)
    t = lora.lora_shrink(x, a, slots)
    monkeypatch.undo()
    if num_tokens < 8:  # decode-sized: the input dimension is split over programs
        assert t.shape[0] > 1
    assert not t.isnan().any()
    torch.testing.assert_close(t.sum(0), reference.lora_shrink(x, a, slots), rtol=1e-4, atol=1e-4)


@in_process
@pytest.mark.parametrize(
    ("num_tokens", "sizes"),
    [
        (3, (64, 32, 32)),  # the tiny Llama's q/k/v: an output tile straddles k and v
        (70, (128, 64, 64)),  # q/k/v on tile boundaries
        (5, (100, 100)),  # gate/up, ragged
    ],
)
def test_lora_expand_of_a_fused_layer_reads_only_its_diagonal_blocks(num_tokens: int, sizes: tuple) -> None:
    """A fused layer's block-diagonal B, given its sub-matrices' row offsets: the expand reads only
    the diagonal blocks (here garbage elsewhere, where the engine's slots hold zeros) and matches
    the reference's full product over the zero-filled B, tiles straddling two sub-matrices too."""
    from ops.triton.lora import lora_expand

    rank, num_slots = 16, 3
    gen = torch.Generator().manual_seed(num_tokens)
    lora_dim, out = rank * len(sizes), sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    b = torch.zeros(num_slots, out, lora_dim)
    for i, (start, rows) in enumerate(zip(offsets, sizes, strict=True)):
        b[:, start : start + rows, i * rank : (i + 1) * rank] = torch.randn(
            num_slots, rows, rank, generator=gen
        )
    garbage = b + (b == 0) * torch.randn(b.shape, generator=gen) * 1e3  # off the diagonal blocks
    t = torch.randn(num_tokens, lora_dim, generator=gen)
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).to(torch.int32)
    slots[0] = 1
    y = torch.randn(num_tokens, out, generator=gen)
    t, b, garbage, slots, y = (x.to(DEVICE) for x in (t, b, garbage, slots, y))
    y_ref = reference.lora_expand(t, b, slots, y.clone())
    y_out = lora_expand(t, garbage, slots, y.clone(), offsets)
    torch.testing.assert_close(y_out, y_ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(y_out, y)


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


def _write_adapter(path: Path, config: dict, rank: int) -> None:
    """A rank-`rank` adapter on all seven projections of every layer of the tiny Llama."""
    from safetensors.torch import save_file

    hidden, kv, inter = config["hidden_size"], 2 * 16, config["intermediate_size"]
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
    }
    shapes |= {
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
    }
    shapes["mlp.down_proj"] = (inter, hidden)
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for proj, (n_in, n_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.2
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps({"r": rank, "lora_alpha": 2 * rank, "target_modules": "all"})
    )
    save_file(tensors, str(path / "adapter_model.safetensors"))


@in_process
def test_model_forward_with_adapters_on_triton_matches_torch(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The LoRA layers through the Triton kernels in a whole forward (fused qkv/gate_up, o_proj's
    input a view, a prefill of one adapter beside a base-model prefill and a second adapter): the
    logits match the torch reference path's, and the adapters change them."""
    from engine.config import EngineConfig
    from engine.lora.request import LoRARequest
    from engine.worker.model_runner import ModelRunner

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    _write_adapter(tmp_path / "a", config, 8)
    _write_adapter(tmp_path / "b", config, 4)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 500, size=n)] for n in (9, 7, 12)]
    logits = {}
    for use_triton in (False, True):
        engine_config = EngineConfig(
            model=str(tiny_llama_dir), device=DEVICE, dtype="float32", num_kv_blocks=8, enforce_eager=True,
            enable_lora=True, max_loras=2,
        )  # fmt: skip
        runner = ModelRunner(engine_config.resolve())
        runner.load_model(use_triton=use_triton)
        runner.initialize_kv_cache(8)
        adapters = [runner.lora.add(LoRARequest(n, i + 1, str(tmp_path / n))) for i, n in enumerate("ab")]
        per_seq = [adapters[0], None, adapters[1]]
        lens = [len(p) for p in prompts]
        ends = np.cumsum(lens) - 1
        step = runner._build_inputs(prompts, [0, 0, 0], lens, [[0], [1], [2]], ends)
        with torch.inference_mode():
            runner.lora.prepare_step(per_seq, lens, sum(lens))
            hidden = runner._forward(step.input_ids, step.positions, step.metadata)
            logits[use_triton] = runner.compute_logits(hidden[step.logits_indices])
            if not use_triton:  # the base model alone, for the rows' comparison below
                runner.lora.prepare_step([None, None, None], lens, sum(lens))
                hidden = runner._forward(step.input_ids, step.positions, step.metadata)
                base = runner.compute_logits(hidden[step.logits_indices])
    assert (logits[True] - logits[False]).abs().max().item() < 1e-3
    assert (base[1] - logits[True][1]).abs().max().item() < 1e-4  # no adapter: the base model's logits
    assert (base[0] - logits[True][0]).abs().max().item() > 1e-2
    assert (base[2] - logits[True][2]).abs().max().item() > 1e-2
