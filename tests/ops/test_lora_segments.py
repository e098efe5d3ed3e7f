"""The segment LoRA kernels (ops/triton/lora_segments.py) against the torch references, under
TRITON_INTERPRET=1 without a GPU, and the host's segment builder (engine/lora/segments.py): decode
steps of many adapters in runs, prompts cut into pieces, tokens without an adapter left untouched,
runs of one slot that recur (unsorted batches), more segments than programs, fused layers, and each
launch the wrappers' rule (segment_launch) picks."""

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

from engine.lora.segments import SMALL_PIECE, build_segments, max_segment_entries, segment_piece
from ops import reference
from tests.tiny_models import hf_causal_lm


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def _segments(slots: list[int], piece: int) -> list[tuple[int, int, int]]:
    seg = build_segments(np.array(slots, dtype=np.int32), piece)
    assert seg.dtype == np.int32 and seg[0] == (len(seg) - 1) // 3
    return [tuple(int(v) for v in seg[1 + 3 * i : 4 + 3 * i]) for i in range(seg[0])]


def test_segments_are_the_runs_of_one_slot_without_the_base_tokens() -> None:
    assert _segments([-1, 2, 2, 2, 0, 0, -1, -1, 5], piece=16) == [(1, 4, 2), (4, 6, 0), (8, 9, 5)]
    # a slot that comes back later is a segment of its own (an unsorted batch stays correct)
    assert _segments([3, 1, 3], piece=16) == [(0, 1, 3), (1, 2, 1), (2, 3, 3)]
    assert _segments([-1, -1], piece=16) == []
    assert _segments([], piece=16) == []


def test_a_long_run_is_cut_into_pieces() -> None:
    assert _segments([7] * 37 + [-1] + [1] * 16, piece=16) == [
        (0, 16, 7),
        (16, 32, 7),
        (32, 37, 7),
        (38, 54, 1),
    ]
    assert segment_piece(512) == 16 and segment_piece(513) == 64
    # at most one segment per token: the device buffer's size
    assert len(build_segments(np.arange(10, dtype=np.int32), 16)) == max_segment_entries(10)


def _inputs(slots: list[int], in_features: int, out_features: int, lora_dim: int, num_slots: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n = len(slots)
    x = torch.randn(n, in_features, generator=gen)
    a = torch.randn(num_slots, lora_dim, in_features, generator=gen) * 0.1
    b = torch.randn(num_slots, out_features, lora_dim, generator=gen) * 0.1
    y = torch.randn(n, out_features, generator=gen)
    token_slots = torch.tensor(slots, dtype=torch.int32)
    return (t.to(DEVICE) for t in (x, a, b, token_slots, y))


def _decode_step(num_adapters: int, per_adapter: int) -> list[int]:
    """A decode step ordered by adapter (as the scheduler orders it): base tokens first, then runs."""
    return [-1] * 3 + [s for s in range(num_adapters) for _ in range(per_adapter)]


@in_process
@pytest.mark.parametrize(
    ("slots", "in_features", "out_features", "slice_offsets", "lora_dim", "num_slots", "piece"),
    [
        ([0], 64, 48, (0,), 16, 1, 16),  # batch-1 decode
        (_decode_step(70, 1), 80, 96, (0,), 8, 70, 16),  # more segments than the 64 programs
        (_decode_step(5, 3), 1100, 96, (0, 64, 80), 48, 5, 16),  # fused qkv (3 x 16), input splits
        ([2] * 40 + [-1] * 5 + [0] * 21 + [2] * 3, 64, 200, (0, 100), 32, 3, 16),  # pieces, a slot twice
        ([1] * 150 + [0] * 30, 64, 96, (0,), 16, 2, 64),  # a large step's 64-token pieces
        ([0] * 20 + [1] * 3, 128, 160, (0, 96, 128), 192, 2, 64),  # rank 64 on qkv: a wide tile
        ([0] * 5 + [-1] + [1] * 3, 64, 300, (0,), 128, 2, 16),  # rank 128 in a decode step: 128-wide tiles
    ],
)
def test_segment_kernels_match_the_reference(
    slots: list[int],
    in_features: int,
    out_features: int,
    slice_offsets: tuple[int, ...],
    lora_dim: int,
    num_slots: int,
    piece: int,
) -> None:
    from ops.triton.lora_segments import lora_expand_segments, lora_shrink_segments

    x, a, b, token_slots, y = _inputs(slots, in_features, out_features, lora_dim, num_slots, len(slots))
    if len(slice_offsets) > 1:  # a fused layer's B is block-diagonal, as the slots hold it
        mask = torch.zeros(out_features, lora_dim, device=b.device)
        bounds = [*slice_offsets, out_features]
        width = lora_dim // len(slice_offsets)
        for i in range(len(slice_offsets)):
            mask[bounds[i] : bounds[i + 1], i * width : (i + 1) * width] = 1
        b = b * mask
    segments = torch.from_numpy(build_segments(np.array(slots, dtype=np.int32), piece)).to(DEVICE)
    rows = token_slots >= 0

    t_ref = reference.lora_shrink(x, a, token_slots)
    t = lora_shrink_segments(x, a, segments, piece=piece)  # [split, num_tokens, lora_dim]
    assert t.dtype == torch.float32 and t.shape[1:] == (len(slots), lora_dim)
    torch.testing.assert_close(t.sum(0)[rows], t_ref[rows], rtol=1e-4, atol=1e-4)

    y_ref = reference.lora_expand(t_ref, b, token_slots, y.clone())
    y_out = y.clone()
    assert lora_expand_segments(t, b, segments, y_out, slice_offsets, piece=piece) is y_out
    torch.testing.assert_close(y_out, y_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(y_out[~rows], y[~rows])  # no adapter: the base output is untouched
    assert not torch.equal(y_out[rows], y[rows])


def test_the_launch_rule_picks_the_sweeps_best_for_a1_and_a2_steps() -> None:
    """segment_launch at the H200 sweep's steps (verify-h200-2026-12-03-8ed5bc2: 256 decode tokens):
    8 adapters (A1, max_loras 8) -> 32 shrink programs, 1,024 in all, the expand 256 wide on 16 programs;
    64 (A2) -> 64 and 512, the expand 256 wide on 32; 4 warps; large steps keep the launch before."""
    from ops.triton.lora_segments import (
        DECODE_PIECE,
        FEW_SEGMENTS,
        LARGE_STEPS,
        MANY_SEGMENTS,
        SegmentLaunch,
        _expand_block_n,
        most_segments,
        segment_launch,
    )

    assert DECODE_PIECE == SMALL_PIECE == segment_piece(256)
    assert segment_launch(256, 16, 8) == FEW_SEGMENTS == SegmentLaunch(32, 1024, 16, 256, 4)
    assert segment_launch(256, 16, 64) == MANY_SEGMENTS == SegmentLaunch(64, 512, 32, 256, 4)
    assert segment_launch(1024, 64, 8) == LARGE_STEPS == SegmentLaunch(64, 512, 64, 128, 4)
    # the most segments: one run per slot cut into 16-token pieces, at most one a token
    assert most_segments(256, 16, 8) == 24 and most_segments(256, 16, 64) == 80
    assert most_segments(256, 16, 16) == 32 and segment_launch(256, 16, 16) == FEW_SEGMENTS
    assert segment_launch(256, 16, 17) == MANY_SEGMENTS
    assert most_segments(32, 16, 64) == 32 and segment_launch(32, 16, 64) == FEW_SEGMENTS  # few tokens
    assert most_segments(0, 16, 8) == 0
    # past a 64-wide rank slice the expand's tile stays 128 wide (the sweep measured rank 16)
    assert _expand_block_n(FEW_SEGMENTS, 64) == 256 and _expand_block_n(MANY_SEGMENTS, 128) == 128
    for tokens in (1, 8, 100, 512):  # every decode-sized step: the wrappers' piece is the builder's
        assert segment_piece(tokens) == DECODE_PIECE
        assert segment_launch(tokens, segment_piece(tokens), 64) in (FEW_SEGMENTS, MANY_SEGMENTS)


@in_process
@pytest.mark.parametrize("which", ["FEW_SEGMENTS", "MANY_SEGMENTS", "LARGE_STEPS"])
def test_each_launch_of_the_rule_matches_the_reference(which: str) -> None:
    """Each launch segment_launch picks, passed explicitly, on a small fused step big enough that neither
    program count is cut to the tokens: 83 tokens (3 without an adapter, 20 adapters of 4), a fused
    qkv-like layer of 300 outputs (two 256-wide tiles, the first over all three sub-matrices), and an
    input of 1,100 split 9 ways at 32 programs (1,024 in all), 6 at 64 (512)."""
    from ops.triton import lora_segments
    from ops.triton.lora_segments import lora_expand_segments, lora_shrink_segments, segment_launch

    launch = getattr(lora_segments, which)
    slots = _decode_step(20, 4)
    slice_offsets, out_features, lora_dim = (0, 200, 250), 300, 24
    x, a, b, token_slots, y = _inputs(slots, 1100, out_features, lora_dim, 20, 7)
    mask = torch.zeros(out_features, lora_dim, device=b.device)
    for i, (lo, hi) in enumerate(zip(slice_offsets, [*slice_offsets[1:], out_features], strict=True)):
        mask[lo:hi, 8 * i : 8 * (i + 1)] = 1
    b = b * mask
    segments = torch.from_numpy(build_segments(np.array(slots, dtype=np.int32), 16)).to(DEVICE)
    assert segment_launch(len(slots), 16, 20) == lora_segments.FEW_SEGMENTS  # 25 segments at most

    t_ref = reference.lora_shrink(x, a, token_slots)
    t = lora_shrink_segments(
        x, a, segments, 16, chunk=64, programs=launch.shrink_programs, total_programs=launch.total_programs
    )
    assert t.shape[0] == {"FEW_SEGMENTS": 9, "MANY_SEGMENTS": 6, "LARGE_STEPS": 6}[which]
    rows = token_slots >= 0
    torch.testing.assert_close(t.sum(0)[rows], t_ref[rows], rtol=1e-4, atol=1e-4)
    y_ref = reference.lora_expand(t_ref, b, token_slots, y.clone())
    y_out = lora_expand_segments(
        t, b, segments, y.clone(), slice_offsets, 16, block_n=launch.block_n, programs=launch.expand_programs,
        num_warps=launch.expand_warps,
    )  # fmt: skip
    torch.testing.assert_close(y_out, y_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(y_out[~rows], y[~rows])
    if which == "FEW_SEGMENTS":  # the wrappers' default for this step: the same launch, the same values
        y_default = lora_expand_segments(
            lora_shrink_segments(x, a, segments, 16, chunk=64), b, segments, y.clone(), slice_offsets, 16
        )
        assert torch.equal(y_default, y_out)


@in_process
def test_a_step_without_segments_leaves_y_alone() -> None:
    from ops.triton.lora_segments import lora_expand_segments, lora_shrink_segments

    x, a, b, _, y = _inputs([-1, -1, -1], 64, 32, 16, 2, 0)
    segments = torch.zeros(max_segment_entries(3), dtype=torch.int32, device=DEVICE)  # 0 segments
    y_out = lora_expand_segments(lora_shrink_segments(x, a, segments), b, segments, y.clone())
    assert torch.equal(y_out, y)


@in_process
def test_bad_shapes_are_refused_naming_them() -> None:
    from ops.triton.lora_segments import lora_expand_segments, lora_shrink_segments

    x, a, b, _, y = _inputs([0, 0], 64, 32, 16, 2, 0)
    segments = torch.from_numpy(build_segments(np.array([0, 0], dtype=np.int32), 16)).to(DEVICE)
    with pytest.raises(ValueError, match=r"lora_shrink_segments: x \(2, 32\), A \(2, 16, 64\)"):
        lora_shrink_segments(x[:, :32], a, segments)
    with pytest.raises(ValueError, match=r"lora_expand_segments: slice_offsets \(0, 8, 16, 24\)"):
        lora_expand_segments(torch.zeros(1, 2, 16, device=DEVICE), b, segments, y, (0, 8, 16, 24))


@in_process
def test_a_mixed_step_of_three_adapters_through_the_tiny_llama_matches_the_reference_kernels(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One prefill step of five prompts on adapters a, none, b, a, c (a recurs: two segments of one
    slot) through the tiny Llama: the segment kernels' logits equal the torch reference kernels' and
    the tile kernels' (WEIR_LORA_SEGMENTS=0)."""
    from engine.config import EngineConfig
    from engine.lora.request import LoRARequest
    from engine.worker.model_runner import ModelRunner
    from tests.ops.test_lora_kernels import _write_adapter

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    for name, rank in (("a", 8), ("b", 4), ("c", 16)):
        _write_adapter(tmp_path / name, config, rank)
    prompts = [[5, 9, 3], [7, 7, 1, 2], [11, 4], [3, 3, 3, 3, 8], [2]]
    which = ["a", None, "b", "a", "c"]
    logits = {}
    for variant, use_triton, segments_env in (
        ("reference", False, "1"),
        ("tiles", True, "0"),
        ("segments", True, "1"),
    ):
        monkeypatch.setenv("WEIR_LORA_SEGMENTS", segments_env)
        engine_config = EngineConfig(
            model=str(tiny_llama_dir), device=DEVICE, dtype="float32", num_kv_blocks=16, enforce_eager=True,
            enable_lora=True, max_loras=3, max_lora_rank=16,
        )  # fmt: skip
        runner = ModelRunner(engine_config.resolve())
        runner.load_model(use_triton=use_triton)
        assert runner.lora.batch.use_segments == (variant == "segments")
        runner.initialize_kv_cache(16)
        adapters = {
            name: runner.lora.add(LoRARequest(name, i + 1, str(tmp_path / name)))
            for i, name in enumerate("abc")
        }
        lengths = [len(p) for p in prompts]
        ends = np.cumsum(lengths) - 1  # each prompt's last token
        step = runner._build_inputs(prompts, [0] * 5, lengths, [[i] for i in range(5)], ends)
        with torch.inference_mode():
            runner.lora.prepare_step([adapters.get(w) if w else None for w in which], lengths, sum(lengths))
            hidden = runner._forward(step.input_ids, step.positions, step.metadata)
            logits[variant] = runner.compute_logits(hidden[step.logits_indices])
    assert (logits["segments"] - logits["reference"]).abs().max().item() < 1e-4
    assert (logits["tiles"] - logits["reference"]).abs().max().item() < 1e-4


@in_process
def test_a_segment_table_longer_than_the_forward_touches_no_row_past_it() -> None:
    """A stale table (from a larger step) never reaches past this forward's tokens: the kernels bound
    every segment by T, so no read or write leaves x, t or y."""
    from ops.triton.lora_segments import lora_expand_segments, lora_shrink_segments

    x, a, b, _, y_big = _inputs([0] * 4 + [1] * 12, 64, 32, 16, 2, 3)  # 16 rows of memory
    x, y_after = x[:8], y_big.clone()
    token_slots = torch.tensor([0] * 4 + [1] * 4, dtype=torch.int32, device=DEVICE)
    table = torch.from_numpy(build_segments(np.array([0] * 4 + [1] * 12, dtype=np.int32), 16)).to(DEVICE)
    t = lora_shrink_segments(x, a, table)  # a table of 16 tokens over an 8-token forward
    assert t.shape[1] == 8
    lora_expand_segments(t, b, table, y_after[:8])  # y: the first 8 rows of a 16-row buffer
    y_ref = reference.lora_expand(reference.lora_shrink(x, a, token_slots), b, token_slots, y_big[:8].clone())
    torch.testing.assert_close(y_after[:8], y_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(y_after[8:], y_big[8:])  # the rows past the forward, untouched


@in_process
def test_the_engine_on_the_triton_kernels_matches_peft_through_the_segment_kernels(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLM.generate with every kernel Triton's (the interpreter), so LoRA runs the segment kernels: a batch
    of four PEFT adapters and the base model, under a small token budget that chunks the prompts and mixes
    them with decodes; greedy tokens equal transformers + PEFT's, and every block comes back."""
    from peft import PeftModel

    from engine import LLM, SamplingParams
    from engine.worker.model_runner import ModelRunner
    from tests.engine.test_lora import MAX_TOKENS, _prompts, save_peft_adapters

    load_model = ModelRunner.load_model
    monkeypatch.setattr(
        ModelRunner, "load_model", lambda self, *a, **k: load_model(self, *a, use_triton=True)
    )
    requests = save_peft_adapters(tiny_llama_dir, tmp_path)
    prompts = _prompts(3, (5, 17, 9, 12, 6))
    which = [None, "r4-qv", "r8-all", "r16-regex", "r8-all"]
    llm = LLM(
        str(tiny_llama_dir),
        device="cpu",
        dtype="float32",
        enable_lora=True,
        max_loras=4,
        max_num_batched_tokens=16,
    )
    assert llm.llm_engine.executor.runner.lora.batch.use_segments
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(
        prompts, params, use_tqdm=False, lora_request=[requests[w] if w else None for w in which]
    )
    base = hf_causal_lm(str(tiny_llama_dir), dtype=torch.float32)
    for prompt, adapter, out in zip(prompts, which, outs, strict=True):
        model = base if adapter is None else PeftModel.from_pretrained(base, requests[adapter].lora_path)
        want = (
            model.eval()
            .generate(
                torch.tensor([prompt]),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :]
            .tolist()
        )
        if adapter is not None:
            base = model.unload()  # the base model back, for the next adapter
        assert out.outputs[0].token_ids == want, adapter
    assert llm.llm_engine.scheduler.kv_cache_usage == 0.0
