"""CUDA graphs: the batch-size ladder, bucket selection, padded-row metadata, the static-buffer layout,
and the padded decode path end to end.

On CPU the graph path runs emulated (`capture_cuda_graphs(emulate=True)`: the same static buffer,
padding and replay bookkeeping, with eager "replays"), so everything but the capture itself is tested
in CI. The last test captures real graphs and needs a GPU.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from engine.worker.attention_metadata import build_step_inputs, step_layout
from engine.worker.cuda_graphs import (
    DecodeArrays,
    capture_sizes,
    graph_warmups_from_env,
    mixed_capture_sizes,
    pad_decode_batch,
    pad_mixed_batch,
    padded_size,
)
from engine.worker.model_runner import ModelRunner
from tests.tiny_models import hf_causal_lm

BLOCK_SIZE = 8
NUM_BLOCKS = 64


# ---------------------------------------------------------------------------------- the ladder
def test_capture_sizes_default_ladder() -> None:
    sizes = capture_sizes(max_num_seqs=256, max_cuda_graph_batch_size=256)
    assert sizes[:5] == [1, 2, 4, 8, 16]
    assert sizes[-1] == 256
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:], strict=False))
    assert len(sizes) == 35


def test_capture_sizes_coarser_at_large_batches() -> None:
    sizes = capture_sizes(max_num_seqs=1024, max_cuda_graph_batch_size=1024)
    assert len(sizes) == 67 and sizes[-1] == 1024
    steps = {b: b - a for a, b in zip(sizes, sizes[1:], strict=False)}
    assert {steps[b] for b in sizes if 16 < b <= 256} == {8}
    assert {steps[b] for b in sizes if 256 < b <= 512} == {16}
    assert {steps[b] for b in sizes if b > 512} == {32}
    assert capture_sizes(600, 1024)[-3:] == [544, 576, 600]  # the limit itself closes the ladder


@pytest.mark.parametrize(
    ("max_num_seqs", "max_graph", "expected"),
    [
        (20, 256, [1, 2, 4, 8, 16, 20]),  # the limit itself is captured, so every batch has a graph
        (3, 256, [1, 2, 3]),
        (1, 256, [1]),
        (256, 8, [1, 2, 4, 8]),
        (256, 30, [1, 2, 4, 8, 16, 24, 30]),
    ],
)
def test_capture_sizes_capped(max_num_seqs: int, max_graph: int, expected: list[int]) -> None:
    assert capture_sizes(max_num_seqs, max_graph) == expected


def test_padded_size_picks_next_captured_size() -> None:
    sizes = capture_sizes(256, 64)
    assert [padded_size(sizes, n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 63, 64)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        16,
        24,
        64,
        64,
    ]
    assert padded_size(sizes, 65) is None  # above the largest graph: eager


def test_pad_decode_batch_rows() -> None:
    tables = np.array([[5, 6, 0], [7, 0, 0], [9, 10, 11]], dtype=np.int32)
    arrays = pad_decode_batch(
        input_ids=np.array([11, 12, 13]),
        positions=np.array([17, 3, 40]),
        slot_mapping=np.array([49, 59, 88]),
        seq_lens=np.array([18, 4, 41], dtype=np.int32),
        block_tables=tables,
        batch_size=8,
    )
    assert arrays.input_ids.tolist() == [11, 12, 13] + [0] * 5
    assert arrays.positions.tolist() == [17, 3, 40] + [0] * 5
    assert arrays.slot_mapping.tolist() == [49, 59, 88] + [-1] * 5  # padding writes nothing
    assert arrays.seq_lens.tolist() == [18, 4, 41] + [1] * 5  # ... and reads one position
    assert arrays.query_start_loc.tolist() == list(range(9))  # one token per row
    assert arrays.block_tables.shape == (8, 3)
    assert (arrays.block_tables[:3] == tables).all()
    assert (arrays.block_tables[3:] == 0).all()  # block 0 always exists
    with pytest.raises(ValueError):
        pad_decode_batch(arrays.input_ids, arrays.positions, arrays.slot_mapping, arrays.seq_lens, tables, 4)


def test_step_layout_is_aligned_and_graph_inputs_do_not_move_with_logits_rows() -> None:
    a, _ = step_layout(num_tokens=24, num_seqs=24, block_table_width=33, num_logits_rows=1)
    b, _ = step_layout(num_tokens=24, num_seqs=24, block_table_width=33, num_logits_rows=48)
    for name, (offset, _shape) in a.items():
        assert offset % 16 == 0, name
        if name != "logits_indices":
            assert b[name] == a[name]


def test_build_step_inputs_into_a_wider_static_buffer() -> None:
    out = torch.full((4096,), 255, dtype=torch.uint8)
    arrays = pad_decode_batch(
        np.array([3, 4]),
        np.array([9, 20]),
        np.array([17, 44]),
        np.array([10, 21], dtype=np.int32),
        np.array([[2, 0], [5, 6]], dtype=np.int32),
        batch_size=4,
    )
    step = build_step_inputs(
        input_ids=arrays.input_ids,
        positions=arrays.positions,
        slot_mapping=arrays.slot_mapping,
        block_tables=arrays.block_tables,
        seq_lens=arrays.seq_lens,
        query_start_loc=arrays.query_start_loc,
        logits_indices=np.array([0, 1]),
        device=torch.device("cpu"),
        out=out,
        block_table_width=16,
        max_seq_len=256,
        num_actual_tokens=2,
        cuda_graph_size=4,
    )
    md = step.metadata
    assert step.input_ids.data_ptr() == out.data_ptr()  # views into the static buffer
    assert step.input_ids.tolist() == [3, 4, 0, 0]
    assert md.slot_mapping.tolist() == [17, 44, -1, -1]
    assert md.seq_lens.dtype == torch.int32 and md.seq_lens.tolist() == [10, 21, 1, 1]
    assert md.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert md.block_tables.shape == (4, 16) and md.block_tables.stride() == (16, 1)
    assert md.block_tables[:, :2].tolist() == [[2, 0], [5, 6], [0, 0], [0, 0]]
    assert step.logits_indices.tolist() == [0, 1]
    assert (md.max_query_len, md.max_seq_len, md.num_actual_tokens, md.cuda_graph_size) == (1, 256, 2, 4)


# ---------------------------------------------------------------------------------- the padded path
def _runner(model_dir: Path, **overrides) -> ModelRunner:
    config = EngineConfig(
        model=str(model_dir), device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS, **overrides
    )
    runner = ModelRunner(config.resolve())
    runner.load_model()
    runner.initialize_kv_cache(runner.determine_num_kv_blocks())
    return runner


def _prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def _decode_three(runner: ModelRunner) -> tuple[list[int], list[dict[str, list[int]]]]:
    """Prefill three requests in one step, then two decode steps of three rows; returns sampled ids."""
    prompts = _prompts((5, 11, 17))
    blocks = {"a": [3, 9], "b": [20, 4], "c": [30, 31, 32]}
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    new = [
        NewRequestData(r, p, len(p), params, blocks[r], 0)
        for r, p in zip(("a", "b", "c"), prompts, strict=True)
    ]
    scheduled = {r: len(p) for r, p in zip(("a", "b", "c"), prompts, strict=True)}
    so = SchedulerOutput(new, [], scheduled, sum(scheduled.values()), set())
    outs = [runner.execute_model(so).sampled_token_ids]
    computed = dict(scheduled)
    for _ in range(2):
        cached = [CachedRequestData(r, [], computed[r]) for r in ("a", "b", "c")]
        so = SchedulerOutput([], cached, {"a": 1, "b": 1, "c": 1}, 3, set())
        outs.append(runner.execute_model(so).sampled_token_ids)
        computed = {r: n + 1 for r, n in computed.items()}
    return [len(p) for p in prompts], outs


def test_emulated_graph_replay_matches_eager_and_writes_only_real_slots(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tiny_model_dirs["qwen3"]
    eager = _runner(model_dir)
    _, eager_out = _decode_three(eager)

    graphed = _runner(model_dir, max_cuda_graph_batch_size=16)
    graphed.capture_cuda_graphs(emulate=True)
    assert graphed.graph_runner is not None
    assert graphed.graph_runner.sizes == [1, 2, 4, 8, 16]
    replayed: list[int | None] = []
    replay = graphed.graph_runner.replay
    monkeypatch.setattr(
        graphed.graph_runner, "replay", lambda md: replayed.append(md.cuda_graph_size) or replay(md)
    )
    _, graphed_out = _decode_three(graphed)

    assert replayed == [4, 4]  # the prefill ran eagerly; both decode steps of 3 rows replayed graph 4
    assert graphed_out == eager_out
    # Padding rows (slot -1) wrote nothing: the same slots hold data (block 0, which padding rows read,
    # stays zero), with the same values up to the rounding of a 4-row instead of a 3-row matmul.
    for (k_e, v_e), (k_g, v_g) in zip(eager.kv_caches, graphed.kv_caches, strict=True):
        for e, g in ((k_e, k_g), (v_e, v_g)):
            assert torch.equal(e.abs().sum(dim=(-2, -1)) > 0, g.abs().sum(dim=(-2, -1)) > 0)
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert not k_g[0].any() and not v_g[0].any()


def test_emulated_graphs_match_eager_through_the_engine(tiny_model_dirs: dict[str, Path]) -> None:
    """Continuous batching with sequences finishing at different steps: every decode batch size from 5
    down to 1 goes through the padded path."""
    model_dir = tiny_model_dirs["llama"]
    prompts = _prompts((5, 17, 33, 40, 9))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (4, 9, 13, 20, 6)]

    def run(emulate: bool) -> list[list[int]]:
        llm = LLM(str(model_dir), device="cpu", dtype="float32", max_cuda_graph_batch_size=8)
        if emulate:
            llm.llm_engine.executor.runner.capture_cuda_graphs(emulate=True)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert run(emulate=True) == run(emulate=False)


def test_mixed_capture_sizes() -> None:
    assert mixed_capture_sizes(0) == []
    assert mixed_capture_sizes(16) == [16]
    assert mixed_capture_sizes(100) == [16, 32, 64, 100]
    assert mixed_capture_sizes(512) == [16, 32, 64, 128, 256, 512]


def test_pad_mixed_batch_layout() -> None:
    """Two sequences (a 3-token prefill chunk and a decode) padded to 8 tokens in 8 sequences."""
    arrays = DecodeArrays(
        input_ids=np.array([11, 12, 13, 21], dtype=np.int64),
        positions=np.array([4, 5, 6, 9], dtype=np.int64),
        slot_mapping=np.array([36, 37, 38, 81], dtype=np.int64),
        seq_lens=np.array([7, 10], dtype=np.int32),
        query_start_loc=np.array([0, 3, 4], dtype=np.int32),
        block_tables=np.array([[4, 0], [9, 10]], dtype=np.int32),
    )
    padded = pad_mixed_batch(arrays, 8)
    assert padded.input_ids.tolist() == [11, 12, 13, 21, 0, 0, 0, 0]
    assert padded.positions.tolist() == [4, 5, 6, 9, 0, 0, 0, 0]
    assert padded.slot_mapping.tolist() == [36, 37, 38, 81, -1, -1, -1, -1]  # padding writes nothing
    # 2 real sequences, 4 one-token padding sequences, 2 empty ones: 8 sequences, 9 offsets
    assert padded.query_start_loc.tolist() == [0, 3, 4, 5, 6, 7, 8, 8, 8]
    assert padded.seq_lens.tolist() == [7, 10, 1, 1, 1, 1, 1, 1]
    assert padded.block_tables.shape == (8, 2)
    assert padded.block_tables[:2].tolist() == [[4, 0], [9, 10]] and not padded.block_tables[2:].any()
    with pytest.raises(ValueError, match="cannot pad 4 tokens to 3"):
        pad_mixed_batch(arrays, 3)


def test_emulated_mixed_graphs_match_eager_through_the_engine(tiny_model_dirs: dict[str, Path]) -> None:
    """Chunked prefill (a 24-token budget) mixes prefill chunks with decodes in most steps: with
    mixed graphs on, those steps replay the padded graphs and every token stays the same."""
    model_dir = tiny_model_dirs["qwen3"]
    prompts = _prompts((5, 17, 33, 40, 9))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (4, 9, 13, 20, 6)]

    def run(mixed_tokens: int) -> tuple[list[list[int]], list[int]]:
        llm = LLM(
            str(model_dir),
            device="cpu",
            dtype="float32",
            max_cuda_graph_batch_size=8,
            max_num_batched_tokens=24,
            max_cuda_graph_mixed_tokens=mixed_tokens,
        )
        replayed: list[int] = []
        if mixed_tokens:
            runner = llm.llm_engine.executor.runner
            runner.capture_cuda_graphs(emulate=True)
            graphs = runner.graph_runner
            assert graphs is not None and graphs.mixed_sizes == [16, 24]
            replay = graphs.replay
            graphs.replay = lambda md: (
                (replayed.append(md.cuda_graph_size) if md.cuda_graph_mixed else None) or replay(md)
            )
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.llm_engine.scheduler.kv_cache_usage == 0.0
        return [o.outputs[0].token_ids for o in outs], replayed

    eager, _ = run(0)
    graphed, mixed_replays = run(32)
    assert graphed == eager
    assert len(mixed_replays) >= 4 and set(mixed_replays) <= {16, 24}


def test_enforce_eager_and_cpu_capture_nothing(tiny_llama_dir: Path) -> None:
    runner = _runner(tiny_llama_dir)
    assert runner.graph_runner is None  # CPU: no graphs unless emulated
    runner.capture_cuda_graphs()
    assert runner.graph_runner is None
    assert set(runner.timings) == {
        "model_build_s",
        "weights_load_s",
        "profile_s",
        "kv_alloc_s",
        "cuda_graph_capture_s",
    }


def test_prompt_logprobs_chunked_by_max_num_seqs(tiny_model_dirs: dict[str, Path]) -> None:
    """Prompt logprobs are projected max_num_seqs rows at a time (the memory profile's bound on
    logits rows); the chunking changes nothing a user sees."""
    model_dir = tiny_model_dirs["qwen2"]
    prompt = _prompts((13,))[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    outs = []
    for max_num_seqs in (256, 2):
        runner = _runner(model_dir, max_num_seqs=max_num_seqs)
        new = NewRequestData("p", prompt, len(prompt), params, [1, 2], 0)
        outs.append(runner.execute_model(SchedulerOutput([new], [], {"p": 13}, 13, set())))
    full, chunked = (o.prompt_logprobs["p"] for o in outs)
    assert len(full) == len(chunked) == 12
    for a, b in zip(full, chunked, strict=True):
        assert (a.chosen_token_id, a.chosen_rank, a.token_ids) == (
            b.chosen_token_id,
            b.chosen_rank,
            b.token_ids,
        )
        assert a.chosen_logprob == pytest.approx(b.chosen_logprob, abs=1e-5)
    assert outs[0].sampled_token_ids == outs[1].sampled_token_ids


# ---------------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager_and_transformers_on_gpu(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["qwen2"]
    prompts = _prompts((5, 17, 33))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    hf = hf_causal_lm(str(model_dir), dtype=torch.float32).eval()
    expected = []
    for p in prompts:
        out = hf.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        expected.append(out[0, len(p) :].tolist())

    results = {}
    for eager in (False, True):
        llm = LLM(
            str(model_dir),
            device="cuda",
            dtype="float32",
            num_kv_blocks=128,
            max_cuda_graph_batch_size=8,
            enforce_eager=eager,
        )
        runner = llm.llm_engine.executor.runner
        assert (runner.graph_runner is None) == eager
        if not eager:
            assert runner.graph_runner is not None and runner.graph_runner.sizes == [1, 2, 4, 8]
            assert runner.timings["cuda_graph_capture_s"] > 0
        results[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
        torch.cuda.empty_cache()
    assert results[False] == results[True] == expected


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, "representative"), ("all", "all"), (" representative ", "representative")]
)
def test_graph_warmups_from_env(monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: str) -> None:
    if raw is None:
        monkeypatch.delenv("WEIR_GRAPH_WARMUPS", raising=False)
    else:
        monkeypatch.setenv("WEIR_GRAPH_WARMUPS", raw)
    assert graph_warmups_from_env() == expected


def test_a_bad_graph_warmups_value_stops_the_engine_build(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path
) -> None:
    monkeypatch.setenv("WEIR_GRAPH_WARMUPS", "some")
    runner = _runner(tiny_llama_dir, max_cuda_graph_batch_size=4)
    with pytest.raises(ValueError, match="WEIR_GRAPH_WARMUPS must be 'all' or 'representative'; got 'some'"):
        runner.capture_cuda_graphs(emulate=True)
