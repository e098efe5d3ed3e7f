"""CUDA graphs for decode steps: one graph per batch size of a ladder, replayed with padding.

At start-up (after the KV cache exists) the runner captures the forward of decode-only batches — one
token per sequence — for batch sizes 1, 2, 4, 8, 16, 24, ... (see `capture_sizes`) up to
min(max_num_seqs, max_cuda_graph_batch_size), largest first so the smaller graphs reuse the largest one's memory from
one shared pool. Every graph reads its inputs from one static device buffer, at the offsets
`engine.worker.attention_metadata.step_layout` gives for its batch size; a step of n sequences is built
padded to the next captured size B straight into that buffer (one host->device copy) and replays
graph B. Padding rows write nothing (slot -1) and attend to one position of block 0 (seq_len 1), which
always exists. Mixed/prefill steps and decode batches above the largest size run eagerly.

Attention is captured with max_query_len=1 and max_seq_len=max_model_len (an upper bound): the Triton
kernel fixes its launch shape (split-KV segment count included) from these Python ints at capture and
reads the real seq_lens from the device at replay; segments past a sequence's end are empty.

`emulate=True` runs the same static-buffer path with eager "replays" instead of graphs, so the padding
logic is testable on CPU.

With LoRA on (`lora` given: the LoRABatch every LoRA layer reads), each size is captured twice: with
the LoRA term (`lora.active` True: the shrink and expand kernels of every layer, reading the per-token
slot index and the segment table, engine/lora/segments.py, from their static tensors) and without it (`active` False: the base model's kernels only). A
replay picks the variant from `lora.active`, which the step's `LoRAManager.prepare_step` sets: False
when no token of the step has an adapter, so base-model steps on a LoRA engine launch no LoRA kernel.
What the second set costs: both sets share one memory pool and are captured back to back, so a
no-LoRA graph reuses the blocks its LoRA twin freed (it needs a subset of them). Each graph keeps its
static output ([size, hidden] in the pool: the sum of the captured sizes x hidden x dtype bytes; at
the Llama-3-8B shape 4,231 rows x 8 KiB = 33 MiB for the decode ladder to 256, 188 MiB for the
default ladder to 1024 with the six mixed sizes) and its CUDA graph object; memory_profile's
per-graph allowance counts both sets. Start-up captures twice as many graphs, with no second warm-up
forward (the variant without LoRA runs a subset of the kernels just warmed up at the same shapes).

The graph runner gets what it needs from the model runner explicitly (the eager forward as a callable
over the model, the device, the pinned staging buffer, the block-table width) and holds no reference
to the model runner: a runner -> graph runner -> runner cycle kept a dropped engine's KV cache and
graphs alive until a garbage collection.
"""

from __future__ import annotations

import bisect
import functools
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.model.quantization.float_gemv import decode_gemv_allowed
from engine.worker.attention_metadata import (
    AttentionMetadata,
    PinnedStaging,
    StepInputs,
    build_step_inputs,
    step_layout,
)
from engine.worker.compile_ahead import compile_ahead, representative_sizes
from engine.worker.warmup_summary import warmup_summary

if TYPE_CHECKING:
    from engine.lora.layers import LoRABatch

logger = logging.getLogger("weir.engine")

# A decode step has at most one sampled row and one prompt-logprob row per sequence.
LOGITS_ROWS_PER_SEQ = 2


def capture_sizes(max_num_seqs: int, max_cuda_graph_batch_size: int) -> list[int]:
    """The batch sizes to capture, ascending: 1, 2, 4, 8, then steps of 8 up to 256, of 16 up to 512,
    of 32 beyond, and the limit itself.

    Coarser steps at large batches keep the graph count (and start-up capture time) down where the
    padding costs least: a padding row reads no KV and adds one row to GEMMs that are weight-bound.
    """
    limit = min(max_num_seqs, max_cuda_graph_batch_size)
    sizes = [s for s in (1, 2, 4, 8) if s <= limit]
    sizes += list(range(16, min(limit, 256) + 1, 8))
    sizes += list(range(272, min(limit, 512) + 1, 16))
    sizes += list(range(544, limit + 1, 32))
    if sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def mixed_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture mixed (prefill + decode) steps at: 16, 32, 64, ... up to max_tokens,
    and max_tokens itself; [] when max_tokens is 0 (mixed graphs off)."""
    if max_tokens <= 0:
        return []
    sizes = []
    size = 16
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    sizes.append(max_tokens)
    return sizes


# device index -> the side stream every capture in the process runs on (see capture_stream).
_capture_streams: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream graphs are captured on: one per device for the whole process.

    cuBLAS keeps a workspace (32 MiB on Hopper) for every stream it has run on, for the life of the
    process; a fresh stream per engine left one behind per engine built (measured: +32 MiB held and
    8192 fewer KV blocks of the tiny model for each engine built back to back). Engines built one
    after another now reuse the stream, and its workspace.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _capture_streams.get(index)
    if stream is None:
        stream = _capture_streams[index] = torch.cuda.Stream(device)
    return stream


def padded_size(sizes: list[int], num_seqs: int) -> int | None:
    """The smallest captured size >= num_seqs (sizes ascending); None above the largest."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


@dataclass(slots=True)
class DecodeArrays:
    """A decode batch's host arrays (one token per sequence), as `build_step_inputs` takes them."""

    input_ids: np.ndarray  # [B] int64
    positions: np.ndarray  # [B] int64
    slot_mapping: np.ndarray  # [B] int64
    seq_lens: np.ndarray  # [B] int32
    query_start_loc: np.ndarray  # [B + 1] int32
    block_tables: np.ndarray  # [B, w] int32


def pad_decode_batch(
    input_ids: Sequence[int],  # [n]
    positions: Sequence[int],  # [n]
    slot_mapping: Sequence[int],  # [n]
    seq_lens: Sequence[int],  # [n]
    block_tables: np.ndarray,  # [n or batch_size, w]; rows past n, if given, must be zero
    batch_size: int,
) -> DecodeArrays:
    """Pad n decode rows to batch_size rows.

    Padding rows: token 0 at position 0, slot -1 (the KV write skips it), seq_len 1 over block 0 (a real
    block, so the attention read is in bounds; its output is never used).
    """
    n = len(input_ids)
    if n > batch_size:
        raise ValueError(f"cannot pad {n} rows to {batch_size}")
    pad = batch_size - n
    if block_tables.shape[0] != batch_size:
        tables = np.zeros((batch_size, max(int(block_tables.shape[1]), 1)), dtype=np.int32)
        tables[:n, : block_tables.shape[1]] = block_tables
    else:
        tables = block_tables
    return DecodeArrays(
        input_ids=np.array([*input_ids, *([0] * pad)], dtype=np.int64),
        positions=np.array([*positions, *([0] * pad)], dtype=np.int64),
        slot_mapping=np.array([*slot_mapping, *([-1] * pad)], dtype=np.int64),
        seq_lens=np.array([*seq_lens, *([1] * pad)], dtype=np.int32),
        query_start_loc=np.arange(batch_size + 1, dtype=np.int32),
        block_tables=tables,
    )


def pad_mixed_batch(arrays: DecodeArrays, num_tokens: int) -> DecodeArrays:
    """Pad a mixed step of T tokens in S sequences to `num_tokens` tokens in `num_tokens` sequences:
    the layout a mixed graph of that size was captured with (so S <= T <= num_tokens always fits).

    Padding tokens are one-token sequences exactly like decode padding rows (token 0 at position 0,
    slot -1, seq_len 1 over block 0); the sequences left over get no tokens (the attention kernel's
    programs for them leave at once) and seq_len 1.
    """
    t = int(arrays.input_ids.shape[0])
    s = int(arrays.seq_lens.shape[0])
    if t > num_tokens:
        raise ValueError(f"cannot pad {t} tokens to {num_tokens}")
    pad_tokens = num_tokens - t
    tables = np.zeros((num_tokens, max(int(arrays.block_tables.shape[1]), 1)), dtype=np.int32)
    tables[:s, : arrays.block_tables.shape[1]] = arrays.block_tables
    query_start_loc = np.empty(num_tokens + 1, dtype=np.int32)
    query_start_loc[: s + 1] = arrays.query_start_loc
    query_start_loc[s + 1 : s + 1 + pad_tokens] = np.arange(t + 1, num_tokens + 1)
    query_start_loc[s + 1 + pad_tokens :] = num_tokens
    return DecodeArrays(
        input_ids=np.concatenate([arrays.input_ids, np.zeros(pad_tokens, dtype=np.int64)]),
        positions=np.concatenate([arrays.positions, np.zeros(pad_tokens, dtype=np.int64)]),
        slot_mapping=np.concatenate([arrays.slot_mapping, np.full(pad_tokens, -1, dtype=np.int64)]),
        seq_lens=np.concatenate([arrays.seq_lens, np.ones(num_tokens - s, dtype=np.int32)]),
        query_start_loc=query_start_loc,
        block_tables=tables,
    )


def static_buffer_bytes(max_batch_size: int, block_table_width: int, max_mixed_tokens: int = 0) -> int:
    """Bytes of the static input buffer: the larger of the largest decode batch's layout and the
    largest mixed step's (T tokens, T sequences, up to T logits rows)."""
    _, nbytes = step_layout(
        max_batch_size, max_batch_size, block_table_width, LOGITS_ROWS_PER_SEQ * max_batch_size
    )
    if max_mixed_tokens:
        _, mixed = step_layout(max_mixed_tokens, max_mixed_tokens, block_table_width, max_mixed_tokens)
        nbytes = max(nbytes, mixed)
    return nbytes


GRAPH_WARMUPS_ENV = "WEIR_GRAPH_WARMUPS"


def graph_warmups_from_env() -> str:
    """WEIR_GRAPH_WARMUPS: "representative" (the default: an eager warm-up only before the captures of
    compile_ahead.representative_sizes, where every kernel variant and cuBLAS choice is met; a capture
    that fails without one is warmed up and captured again) or "all" (a warm-up before every size's
    capture). Measured on an H100 (2026-12-06, Llama-3-8B shape, warm Triton cache): U1 6.95 -> 6.10 s,
    the CUDA graphs 2.23 -> 1.42 s; the GPU engine check 114/114 with it."""
    value = os.environ.get(GRAPH_WARMUPS_ENV, "representative").strip() or "representative"
    if value not in ("all", "representative"):
        raise ValueError(f"{GRAPH_WARMUPS_ENV} must be 'all' or 'representative'; got {value!r}")
    return value


# The eager forward a graph captures: (input_ids [T], positions [T], metadata) -> hidden [T, hidden].
EagerForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


@dataclass(slots=True)
class _Captured:
    replay: Callable[[], None]
    output: torch.Tensor  # [batch_size, hidden]: the graph's static output


class CUDAGraphRunner:
    """Captures and replays the runner's forward for decode batches of the sizes in `sizes` and, when
    `mixed_sizes` is given, for mixed prefill + decode steps of those token counts."""

    def __init__(
        self,
        forward: EagerForward,
        sizes: list[int],
        *,
        device: torch.device,
        block_table_width: int,  # max_blocks_per_seq: the widest block table a graph step can carry
        max_seq_len: int,  # max_model_len: attention's launch shape is fixed from it at capture
        staging: PinnedStaging | None = None,
        emulate: bool = False,
        mixed_sizes: list[int] | None = None,
        lora: LoRABatch | None = None,  # LoRA on: capture each size with and without the LoRA term
        compile_ahead: bool = False,  # warm-ups' Triton compiles to the compile pool first
    ) -> None:
        self.forward = forward
        self.warm_every_size = graph_warmups_from_env() == "all"
        self.compile_ahead = compile_ahead
        self.compile_ahead_figures: dict[str, float] = {}
        self.lora = lora
        # The LoRA variants captured per size: `lora.active` at capture (None: LoRA is off).
        self.lora_variants: tuple[bool | None, ...] = (True, False) if lora is not None else (None,)
        self.device = device
        self.staging = staging
        self.max_seq_len = max_seq_len
        self.sizes = sorted(sizes)
        self.max_batch_size = self.sizes[-1]
        self.mixed_sizes = sorted(mixed_sizes or [])
        self.block_table_width = block_table_width
        self.emulate = emulate
        self.input_buffer = torch.zeros(
            static_buffer_bytes(
                self.max_batch_size, self.block_table_width, self.mixed_sizes[-1] if self.mixed_sizes else 0
            ),
            dtype=torch.uint8,
            device=device,
        )
        # (size, LoRA variant) -> graph
        self._graphs: dict[tuple[int, bool | None], _Captured] = {}
        self._mixed_graphs: dict[tuple[int, bool | None], _Captured] = {}
        # Views of input_buffer by step layout, so a replay step builds no new tensors for them.
        self.view_cache: dict[tuple[int, int, int, int], dict[str, torch.Tensor]] = {}
        self.pool: tuple[int, int] | None = None
        self.capture_seconds = 0.0
        self.warmup_seconds = 0.0  # of capture_seconds: the eager warm-up forwards
        self.warmup_by_step: dict[str, float] = {}  # "decode 8" / "mixed 64" -> its warm-up's seconds
        self.memory_bytes = 0  # device memory the capture took (graph pool, graph objects)

    def padded_size(self, num_seqs: int) -> int | None:
        return padded_size(self.sizes, num_seqs)

    def padded_mixed_size(self, num_tokens: int) -> int | None:
        """The smallest mixed graph for a step of num_tokens tokens; None without one."""
        return padded_size(self.mixed_sizes, num_tokens) if self.mixed_sizes else None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs) + len(self._mixed_graphs)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        device = self.device
        on_cuda = device.type == "cuda" and not self.emulate
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            free_before, _ = torch.cuda.mem_get_info(device)
            self.pool = torch.cuda.graph_pool_handle()
            stream = capture_stream(device)
        # Objects alive now stay alive: freezing them keeps any gc.collect() during the captures cheap.
        gc.collect()
        gc.freeze()
        lora_active = self.lora.active if self.lora is not None else None
        try:
            # Batch-1 linears may take the Triton GEMV here: graphs replay it (float_gemv.py).
            with decode_gemv_allowed():
                if on_cuda and self.compile_ahead:
                    self.compile_ahead_figures = compile_ahead("cuda graphs", self._dry_warmups())
                # Decode sizes first (the largest batch needs the most memory), then the mixed sizes.
                plan = [(bs, False) for bs in reversed(self.sizes)] + [
                    (t, True) for t in reversed(self.mixed_sizes)
                ]
                # WEIR_GRAPH_WARMUPS=representative: warm-ups at these sizes only (every kernel variant
                # should be met there; see graph_warmups_from_env).
                warmed_sizes = set(plan) if self.warm_every_size else self._representative_plan()
                for bs, mixed in plan:
                    step = self.dummy_mixed_step(bs) if mixed else self.dummy_step(bs)
                    graphs = self._mixed_graphs if mixed else self._graphs
                    label = f"{'mixed' if mixed else 'decode'} {bs}"
                    # With LoRA: the variant with the LoRA term first (the larger), then the one without.
                    for variant in self.lora_variants:
                        if self.lora is not None:
                            self.lora.active = bool(variant)
                        if not on_cuda:
                            graphs[bs, variant] = self._emulated(step, variant)
                            continue
                        # Warm-up outside the capture: Triton compiles and cuBLAS picks its kernels here
                        # (the variant without LoRA runs a subset of these kernels). One per size: sizes
                        # may launch different kernel variants (decode attention splits KV below some
                        # batch size; Triton specializes ints on ==1 and %16 unless a kernel opts out;
                        # cuBLAS picks by shape), and a variant first met inside a capture would compile
                        # or load there. The log line below shows what each one cost;
                        # loadtest/trace_compiles.py shows which kernels compiled.
                        warmed = variant is not False and (bs, mixed) in warmed_sizes
                        if warmed:
                            self._warm_up(step, stream, label)
                        try:
                            graphs[bs, variant] = self._capture(step, stream)
                        except RuntimeError:
                            if warmed or variant is False:
                                raise
                            logger.warning(
                                "CUDA graph %s: the capture without a warm-up failed; warming up and "
                                "capturing again",
                                label,
                                exc_info=True,
                            )
                            torch.cuda.synchronize(device)
                            self._warm_up(step, stream, label)
                            graphs[bs, variant] = self._capture(step, stream)
        finally:
            gc.unfreeze()
            if self.lora is not None:
                self.lora.active = bool(lora_active)
        if on_cuda:
            torch.cuda.synchronize(device)
            free_after, _ = torch.cuda.mem_get_info(device)
            self.memory_bytes = max(free_before - free_after, 0)
        self.capture_seconds = time.perf_counter() - start
        sizes, mixed = self.sizes, self.mixed_sizes
        logger.info(
            "CUDA graphs captured in %.2fs (warm-up forwards %.2fs): %d decode batch sizes (%d..%d), "
            "%d mixed step sizes (%s tokens)%s, %.3f GiB%s",
            self.capture_seconds,
            self.warmup_seconds,
            len(sizes),
            sizes[0],
            sizes[-1],
            len(mixed),
            f"{mixed[0]}..{mixed[-1]}" if mixed else "-",
            ", each with and without LoRA" if self.lora is not None else "",
            self.memory_bytes / (1 << 30),
            " (emulated)" if self.emulate else "",
        )
        if self.warmup_by_step:
            logger.info("CUDA graph warm-up forwards: %s", warmup_summary(self.warmup_by_step))

    def _emulated(self, step: StepInputs, variant: bool | None) -> _Captured:
        """CPU stand-in for a graph: rerun the forward on the static inputs into a fixed output.

        The LoRA variant is fixed at capture as in a real graph (whose kernels are baked in): a replay
        runs the LoRA term exactly when the graph was captured with it, whatever `lora.active` says
        now, so a wrong variant choice shows in the outputs on CPU too."""
        forward = self.forward
        lora = self.lora
        output = forward(step.input_ids, step.positions, step.metadata).clone()

        # Closes over the forward, the step and the LoRA batch, not self: a closure holding the graph
        # runner, stored in the graph runner, would be a reference cycle.
        def replay() -> None:
            if lora is None:
                output.copy_(forward(step.input_ids, step.positions, step.metadata))
                return
            active, lora.active = lora.active, bool(variant)
            try:
                output.copy_(forward(step.input_ids, step.positions, step.metadata))
            finally:
                lora.active = active

        return _Captured(replay=replay, output=output)

    def step_inputs(
        self,
        arrays: DecodeArrays,
        logits_indices: np.ndarray,
        size: int,
        num_actual_tokens: int,
        mixed: bool = False,
    ) -> StepInputs:
        """Copy a step padded to a captured size into the static buffer, at that size's layout (block
        tables block_table_width wide, max_seq_len fixed).

        Graph steps fix the Python ints the attention launch depends on: a decode graph is captured
        with max_query_len 1 (decode launch settings, split-KV from max_seq_len), a mixed graph with
        max_query_len = its token count (prefill launch settings, whose grid depends on shapes only).
        """
        return build_step_inputs(
            input_ids=arrays.input_ids,
            positions=arrays.positions,
            slot_mapping=arrays.slot_mapping,
            block_tables=arrays.block_tables,
            seq_lens=arrays.seq_lens,
            query_start_loc=arrays.query_start_loc,
            logits_indices=logits_indices,
            device=self.device,
            staging=self.staging,
            out=self.input_buffer,
            block_table_width=self.block_table_width,
            num_actual_tokens=num_actual_tokens,
            max_query_len=size if mixed else 1,
            max_seq_len=self.max_seq_len,
            cuda_graph_size=size,
            cuda_graph_mixed=mixed,
            view_cache=self.view_cache,
        )

    def dummy_step(self, batch_size: int) -> StepInputs:
        """A batch of padding rows only, in the static buffer: what each graph is captured on."""
        empty = np.zeros(0, dtype=np.int64)
        arrays = pad_decode_batch(
            empty, empty, empty, empty.astype(np.int32), np.zeros((0, 1), dtype=np.int32), batch_size
        )
        return self.step_inputs(arrays, np.zeros(0, dtype=np.int64), batch_size, num_actual_tokens=0)

    def dummy_mixed_step(self, num_tokens: int) -> StepInputs:
        """A mixed step of padding only, at the layout of a mixed graph of num_tokens tokens."""
        empty = np.zeros(0, dtype=np.int64)
        none = DecodeArrays(
            input_ids=empty,
            positions=empty,
            slot_mapping=empty,
            seq_lens=empty.astype(np.int32),
            query_start_loc=np.zeros(1, dtype=np.int32),
            block_tables=np.zeros((0, 1), dtype=np.int32),
        )
        return self.step_inputs(
            pad_mixed_batch(none, num_tokens), np.zeros(0, dtype=np.int64), num_tokens, 0, mixed=True
        )

    def _warm_up(self, step: StepInputs, stream: torch.cuda.Stream, label: str) -> None:
        """One eager forward of `step` on the capture stream, timed into warmup_by_step."""
        device = self.device
        t0 = time.perf_counter()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.forward(step.input_ids, step.positions, step.metadata)
        torch.cuda.current_stream(device).wait_stream(stream)
        seconds = time.perf_counter() - t0
        self.warmup_seconds += seconds
        self.warmup_by_step[label] = seconds

    def _capture(self, step: StepInputs, stream: torch.cuda.Stream) -> _Captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            output = self.forward(step.input_ids, step.positions, step.metadata)
        return _Captured(replay=graph.replay, output=output)

    def _representative_plan(self) -> set[tuple[int, bool]]:
        """(size, mixed) of the representative decode and mixed sizes (compile_ahead's choice)."""
        plan = {(bs, False) for bs in representative_sizes(self.sizes)}
        return plan | {(t, True) for t in representative_sizes(self.mixed_sizes)}

    def _dry_warmups(self) -> list[Callable[[], object]]:
        """compile_ahead's dry forwards: the warm-up of each representative decode and mixed size, with
        the LoRA term where LoRA is on (its kernels include those of the variant without)."""

        def warm_up(size: int, mixed: bool) -> None:
            step = self.dummy_mixed_step(size) if mixed else self.dummy_step(size)
            if self.lora is not None:
                self.lora.active = True
            self.forward(step.input_ids, step.positions, step.metadata)

        plan = sorted(self._representative_plan(), key=lambda size_mixed: (size_mixed[1], size_mixed[0]))
        return [functools.partial(warm_up, size, mixed) for size, mixed in plan]

    def replay_variant(self) -> bool | None:
        """The LoRA variant this step replays: with the LoRA term exactly when some token of the step
        has an adapter (`lora.active`, set by the step's prepare_step); None when LoRA is off."""
        return None if self.lora is None else self.lora.active

    def decode_replay(self, num_seqs: int) -> Callable[[], None] | None:
        """The replay of the decode graph a step of `num_seqs` sequences takes (its padded size, this
        step's LoRA variant), on whatever its static buffer holds now; None without one. For timing the
        graph alone, back to back (loadtest/decode_breakdown.py): a replay rewrites the last step's KV
        slots with the values they hold."""
        size = self.padded_size(num_seqs)
        captured = None if size is None else self._graphs.get((size, self.replay_variant()))
        return None if captured is None else captured.replay

    def replay(self, metadata: AttentionMetadata) -> torch.Tensor:
        """Replay the graph whose static buffer holds this step; returns its [B, hidden] output."""
        assert metadata.cuda_graph_size is not None
        graphs = self._mixed_graphs if metadata.cuda_graph_mixed else self._graphs
        captured = graphs[metadata.cuda_graph_size, self.replay_variant()]
        captured.replay()
        return captured.output
