"""The model runner: owns the model, the KV caches and the per-request state, and turns one
SchedulerOutput into one ModelRunnerOutput.

Hot path. Per step: apply the scheduler's diff to the per-request state, build the flat batch
(input ids, positions, slot mapping, block tables) with numpy, copy it to the device in one transfer,
run the forward, project only the rows that need logits (the last scheduled token of requests that
reach the end of their known tokens, plus prompt positions of requests asking for prompt logprobs, in
chunks of max_num_seqs rows), and sample them with engine.worker.sampler without waiting for the device.

`_forward` is the seam where CUDA graphs replace the eager forward (engine.worker.cuda_graphs: decode-only
steps of up to max_cuda_graph_batch_size sequences are padded to a captured size and replayed);
`build_step_inputs` the one place batches are built.

Host syncs per step: none inside `execute_model_async`; the sampled ids (and logprobs) come back
through a non_blocking copy that `StepInFlight.result()` waits for (engine.worker.step_in_flight). A decode
whose input token is still being sampled by the previous step reads it from that step's device tensor,
so the engine can schedule and launch step N+1 before step N's ids reach the host. Prompt logprobs
and penalties over a token in flight are the exceptions that wait. Step inputs go through a reused
pinned buffer with one non_blocking copy.
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import ResolvedConfig
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler_output import ModelRunnerOutput, NewRequestData, SchedulerOutput, TokenLogprobs
from engine.model.build_context import BuildContext
from engine.model.layers.attention import Attention
from engine.model.layers.attention_backend import AttentionBackend, get_attention_backend
from engine.model.models.registry import get_model_class
from engine.model.quantization import QuantizationConfig
from engine.model.weight_loader import initialize_dummy_weights, load_weights
from engine.worker.attention_metadata import (
    AttentionMetadata,
    PinnedStaging,
    StepInputs,
    build_step_inputs,
    forward_context,
)
from engine.worker.cuda_graphs import (
    CUDAGraphRunner,
    DecodeArrays,
    capture_sizes,
    mixed_capture_sizes,
    pad_decode_batch,
    pad_mixed_batch,
    static_buffer_bytes,
)
from engine.worker.sampler import Sampler, SamplingRow, build_sampling_metadata, compute_prompt_logprobs
from engine.worker.step_in_flight import StepInFlight

logger = logging.getLogger("weir.engine")

_GIB = 1 << 30
_MIB = 1 << 20
# Device memory a captured graph holds besides its share of the pool (instantiated graph, pool-segment
# rounding); an allowance kept out of the KV cache.
# (H100: 35 graphs of Qwen3-0.6B, 28 layers, took 0.10 GiB with their pool, ~3 MiB each.)
_GRAPH_OVERHEAD_BYTES = 4 * _MIB


def eager_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [num_tokens]
    positions: torch.Tensor,  # [num_tokens]
    metadata: AttentionMetadata,
) -> torch.Tensor:
    """The model's forward over a flat batch under its attention metadata -> [num_tokens, hidden].
    A function of the model, not a runner method, so the CUDA-graph runner can hold it (as a partial)
    without holding the runner."""
    with forward_context(metadata):
        return model(input_ids, positions)


def _drop_weight_loaders(model: torch.nn.Module) -> None:
    """Remove the `weight_loader` attributes from the parameters once loading is done.

    A loader is often its layer's bound method stored on the layer's own parameter: a reference cycle
    per layer (layer -> parameter -> bound method -> layer), which kept a dropped engine's weights on
    the device until the next garbage collection.
    """
    for param in model.parameters():
        param.__dict__.pop("weight_loader", None)


def block_table_array(block_tables: list[list[int]], num_rows: int) -> np.ndarray:
    """[num_rows, max(1, longest table)] int32, zero-padded (rows past len(block_tables) too): one flat
    fromiter and one scatter, since a numpy assignment per row costs more."""
    num_seqs = len(block_tables)
    lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=num_seqs)  # [num_seqs]
    total = int(lens.sum())
    tables = np.zeros((num_rows, max(int(lens.max(initial=0)), 1)), dtype=np.int32)
    if total:
        rows = np.repeat(np.arange(num_seqs), lens)
        cols = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        tables[rows, cols] = np.fromiter(
            itertools.chain.from_iterable(block_tables), dtype=np.int32, count=total
        )
    return tables


@dataclass(slots=True, eq=False)
class _RequestState:
    req_id: str
    token_ids: list[int]  # prompt + every output known to the runner
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # False when the request came back after preemption with outputs: its prompt logprobs were sent.
    emit_prompt_logprobs: bool
    # Penalties read the output ids themselves, so such a request cannot sample on top of a token
    # still in flight: the runner resolves the previous step first.
    needs_output_ids: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class ModelRunner:
    def __init__(self, config: ResolvedConfig) -> None:
        self.config = config
        self.model_config = model_config = config.model
        self.device = torch.device(config.device.device)
        self.dtype: torch.dtype = getattr(torch, model_config.dtype)
        self.kv_cache_dtype: torch.dtype = getattr(torch, config.cache.kv_cache_dtype)
        self.block_size = config.cache.block_size
        # The model's limit, which the memory profile and the graphs' block tables are sized for (the
        # scheduler may hold requests shorter, to what the KV cache holds).
        self.max_model_len = model_config.max_model_len
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.vocab_size = model_config.vocab_size
        self.model: torch.nn.Module | None = None
        self.attn_layers: list[Attention] = []
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_kv_blocks = 0
        self.requests: dict[str, _RequestState] = {}
        self.sampler = Sampler()
        self.graph_runner: CUDAGraphRunner | None = None
        self._staging = PinnedStaging() if self.device.type == "cuda" else None
        # Start-up seconds by phase (read by the start-up benchmark).
        self.timings: dict[str, float] = {
            "weights_load_s": 0.0,
            "profile_s": 0.0,
            "kv_alloc_s": 0.0,
            "cuda_graph_capture_s": 0.0,
        }
        # GiB figures of the CUDA memory profile (empty on CPU or with num_kv_blocks set).
        self.memory_profile: dict[str, float] = {}
        torch.manual_seed(config.load.seed)
        self.attn_backend: AttentionBackend | None = None  # chosen once, in load_model

    @property
    def use_cuda_graphs(self) -> bool:
        return self.device.type == "cuda" and self.config.device.use_cuda_graphs

    def cuda_graph_sizes(self) -> list[int]:
        return capture_sizes(self.max_num_seqs, self.config.device.max_cuda_graph_batch_size)

    def cuda_graph_mixed_sizes(self) -> list[int]:
        """Token counts of the mixed-step graphs (none when max_cuda_graph_mixed_tokens is 0)."""
        return mixed_capture_sizes(self.config.device.max_cuda_graph_mixed_tokens)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ setup
    def load_model(
        self, quant_config: QuantizationConfig | None = None, use_triton: bool | None = None
    ) -> None:
        """Choose the attention backend (Triton on CUDA when it can run, else the torch reference;
        `use_triton` forces it, for tests), build the model with it and `quant_config` (None:
        unquantized), then load or dummy-initialise the weights (each ends with the methods'
        post-load hooks)."""
        start = time.perf_counter()
        self.attn_backend = get_attention_backend(
            self.device,
            self.dtype,
            self.kv_cache_dtype,
            self.model_config.head_dim,
            self.block_size,
            use_triton,
        )
        model_cls = get_model_class(self.model_config.architecture)
        ctx = BuildContext(dtype=self.dtype, quant_config=quant_config, attn_backend=self.attn_backend)
        with torch.device(self.device):
            model = model_cls(self.model_config, ctx)
        if self.config.load.load_format == "dummy":
            initialize_dummy_weights(model, seed=self.config.load.seed)
        else:
            load_weights(model, self.model_config.model_path)
        model.eval()
        _drop_weight_loaders(model)
        self.model = model
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self._sync()
        self.timings["weights_load_s"] = time.perf_counter() - start
        num_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "loaded %s (%.1fM parameters, %s, %s, %s attention) in %.2fs",
            self.model_config.architecture,
            num_params / 1e6,
            self.dtype,
            self.device,
            self.attn_backend.name,
            self.timings["weights_load_s"],
        )

    def shutdown(self) -> None:
        """Free the device memory the runner holds (CUDA graphs, KV cache, model) now. Idempotent.

        Dropping the last reference does the same: the runner is in no reference cycle, so plain
        reference counting frees it. This is for callers that keep a reference (LLM.shutdown()).
        """
        self.graph_runner = None
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = None
        self.attn_layers = []
        self.kv_caches = []
        self.num_kv_blocks = 0
        self.model = None
        self.requests.clear()
        self._staging = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @property
    def bytes_per_kv_block(self) -> int:
        """K and V of one block across every layer."""
        cfg = self.model_config
        elem = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        num_kv_heads = self.attn_layers[0].num_kv_heads if self.attn_layers else cfg.num_kv_heads
        return 2 * cfg.num_layers * self.block_size * num_kv_heads * cfg.head_dim * elem

    def determine_num_kv_blocks(self) -> int:
        """config.num_kv_blocks if set; on CPU from cpu_kv_cache_gb; on CUDA from a profile forward."""
        cfg = self.config.cache
        start = time.perf_counter()
        if cfg.num_kv_blocks_override is not None:
            num_blocks = cfg.num_kv_blocks_override
            source = "num_kv_blocks"
        elif self.device.type == "cpu":
            num_blocks = int(cfg.cpu_kv_cache_gb * _GIB) // self.bytes_per_kv_block
            source = f"cpu_kv_cache_gb={cfg.cpu_kv_cache_gb}"
        else:
            num_blocks = self._profile_num_kv_blocks()
            source = f"gpu_memory_utilization={cfg.gpu_memory_utilization}"
        self.timings["profile_s"] = time.perf_counter() - start
        if num_blocks <= 0:
            raise ValueError(
                f"no room for the KV cache ({source} gives {num_blocks} blocks of {self.bytes_per_kv_block} bytes); "
                "raise gpu_memory_utilization / cpu_kv_cache_gb or use a smaller model"
            )
        capacity = num_blocks * self.block_size
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, from %s)",
            num_blocks,
            self.block_size,
            capacity,
            num_blocks * self.bytes_per_kv_block / _GIB,
            source,
        )
        # (Fewer tokens than max_model_len: ResolvedConfig.with_num_kv_blocks caps requests to this.)
        return num_blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache, then capture the CUDA graphs over it (CUDA, unless enforce_eager)."""
        start = time.perf_counter()
        self._allocate_kv_cache(num_blocks)
        self._sync()
        self.timings["kv_alloc_s"] = time.perf_counter() - start
        self.capture_cuda_graphs()

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        """Per-layer K and V caches in the attention backend's shape and dtype ([num_blocks, block_size,
        num_kv_heads, head_dim] for both backends today), bound to the attention layers. Zero-filled so
        kernels never read NaN garbage from unused slots."""
        self.graph_runner = None  # graphs hold the old caches' addresses
        self.kv_caches = []
        backend = self.attn_backend
        assert backend is not None, "load_model() first"
        for layer in self.attn_layers:
            shape = backend.kv_cache_shape(num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            k_cache = torch.zeros(shape, dtype=backend.kv_cache_dtype, device=self.device)
            v_cache = torch.zeros(shape, dtype=backend.kv_cache_dtype, device=self.device)
            layer.k_cache, layer.v_cache = k_cache, v_cache
            self.kv_caches.append((k_cache, v_cache))
        self.num_kv_blocks = num_blocks

    def capture_cuda_graphs(self, emulate: bool = False) -> None:
        """Capture decode graphs for every size of the ladder (no-op without CUDA or with enforce_eager).

        `emulate=True` builds the same static-buffer path with eager replays, on any device (tests).
        """
        if not (self.use_cuda_graphs or emulate) or not self.kv_caches:
            return
        sizes = self.cuda_graph_sizes()
        assert self.model is not None, "load_model() first"
        graph_runner = CUDAGraphRunner(
            functools.partial(eager_forward, self.model),
            sizes,
            device=self.device,
            block_table_width=self.max_blocks_per_seq,
            max_seq_len=self.max_model_len,
            staging=self._staging,
            emulate=emulate,
            mixed_sizes=self.cuda_graph_mixed_sizes(),
        )
        graph_runner.capture()
        self.graph_runner = graph_runner
        self.timings["cuda_graph_capture_s"] = graph_runner.capture_seconds
        logger.info(
            "CUDA graphs captured in %.2fs (warm-up forwards %.2fs): %d decode batch sizes (%d..%d), "
            "%d mixed step sizes (%s tokens), %.3f GiB%s",
            graph_runner.capture_seconds,
            graph_runner.warmup_seconds,
            len(sizes),
            sizes[0],
            sizes[-1],
            len(graph_runner.mixed_sizes),
            f"{graph_runner.mixed_sizes[0]}..{graph_runner.mixed_sizes[-1]}"
            if graph_runner.mixed_sizes
            else "-",
            graph_runner.memory_bytes / _GIB,
            " (emulated)" if emulate else "",
        )

    @torch.inference_mode()
    def _profile_num_kv_blocks(self) -> int:
        """Measure what a running engine needs besides the KV cache, and give the cache the rest of
        total * gpu_memory_utilization.

        Needed: the weights; the activation peak of the largest step the scheduler may send
        (max_num_batched_tokens, plus logits, penalties, logprobs and a top-k/top-p sort for up to
        max_num_seqs rows), as reserved by the caching allocator; the CUDA-graph pool (the activation
        peak of the largest captured decode batch) plus a per-graph allowance; and memory outside
        torch (CUDA context, other processes). The profile runs on a temporary cache just big enough.
        """
        cfg = self.config.cache
        device = self.device
        num_tokens = self.max_num_batched_tokens
        # Sequences as long as allowed: the worst case for attention's working memory.
        seq_lens = [min(self.max_model_len, num_tokens - s) for s in range(0, num_tokens, self.max_model_len)]
        blocks_per_seq = [-(-n // self.block_size) for n in seq_lens]
        num_blocks = sum(blocks_per_seq)
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        weights_reserved = torch.cuda.memory_reserved(device)
        self._allocate_kv_cache(num_blocks)
        temp_cache_bytes = num_blocks * self.bytes_per_kv_block
        try:
            torch.cuda.synchronize(device)
            before_forward = torch.cuda.memory_reserved(device)
            block_ids = iter(range(num_blocks))
            token_ids = [[0] * n for n in seq_lens]
            tables = [[next(block_ids) for _ in range(b)] for b in blocks_per_seq]
            num_rows = min(self.max_num_seqs, num_tokens)
            step = self._build_inputs(
                token_ids, [0] * len(seq_lens), seq_lens, tables, np.arange(num_tokens - num_rows, num_tokens)
            )
            hidden = self._forward(step.input_ids, step.positions, step.metadata)
            logits = self.compute_logits(hidden[step.logits_indices])
            # Every sampler stage at once: the largest working set a step can need.
            params = SamplingParams(
                temperature=0.7,
                top_p=0.9,
                top_k=50,
                min_p=0.05,
                repetition_penalty=1.1,
                frequency_penalty=0.1,
                logprobs=20,
                max_tokens=1,
            )
            rows = [
                SamplingRow(params=params, prompt_token_ids=[0], output_token_ids=[0])
                for _ in range(num_rows)
            ]
            self.sampler(logits, build_sampling_metadata(rows, vocab_size=self.vocab_size, device=device))
            del step, hidden, logits
            torch.cuda.synchronize(device)
            activation_peak = torch.cuda.max_memory_reserved(device) - before_forward

            graph_bytes = 0
            if self.use_cuda_graphs:
                graph_bytes = self._profile_cuda_graph_bytes()
            free, total = torch.cuda.mem_get_info(device)
            non_torch = max((total - free) - torch.cuda.memory_reserved(device), 0)
        finally:
            for layer in self.attn_layers:
                layer.k_cache = layer.v_cache = None
            self.kv_caches = []
            self.num_kv_blocks = 0
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        needed = weights_reserved + activation_peak + graph_bytes + non_torch
        budget = total * cfg.gpu_memory_utilization
        available = budget - needed
        self.memory_profile = {
            "total_gib": total / _GIB,
            "budget_gib": budget / _GIB,
            "weights_gib": weights_reserved / _GIB,
            "activation_peak_gib": activation_peak / _GIB,
            "cuda_graphs_estimate_gib": graph_bytes / _GIB,
            "non_torch_gib": non_torch / _GIB,
            "kv_cache_gib": max(available, 0) / _GIB,
            "profile_temp_cache_gib": temp_cache_bytes / _GIB,
        }
        logger.info(
            "memory profile (%d tokens): weights %.2f GiB, activations %.2f GiB, CUDA graphs ~%.2f GiB, "
            "outside torch %.2f GiB; %.2f of %.2f GiB (x%.2f) left for the KV cache",
            num_tokens,
            weights_reserved / _GIB,
            activation_peak / _GIB,
            graph_bytes / _GIB,
            non_torch / _GIB,
            available / _GIB,
            total / _GIB,
            cfg.gpu_memory_utilization,
        )
        return max(int(available // self.bytes_per_kv_block), 0)

    def _profile_cuda_graph_bytes(self) -> int:
        """Estimate the graph pool: the activation peak of an eager forward of the largest captured
        decode batch (the graphs share one pool, captured largest first), plus the static input buffer
        and a per-graph allowance. Runs on the profile's temporary cache (padding rows only)."""
        sizes = self.cuda_graph_sizes()
        bs = sizes[-1]
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        empty = np.zeros(0, dtype=np.int64)
        arrays = pad_decode_batch(empty, empty, empty, empty.astype(np.int32), np.zeros((0, 1), np.int32), bs)
        step = self._step_inputs(arrays, np.zeros(0, dtype=np.int64), max_seq_len=self.max_model_len)
        hidden = self._forward(step.input_ids, step.positions, step.metadata)
        del step, hidden
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        mixed = self.cuda_graph_mixed_sizes()
        # A mixed graph of T tokens holds no more activations than a decode batch of T rows, and the
        # largest decode batch is captured first; a larger mixed size is the exception to allow for.
        if mixed and mixed[-1] > bs:
            peak = peak * mixed[-1] // bs
        buffer = static_buffer_bytes(bs, self.max_blocks_per_seq, mixed[-1] if mixed else 0)
        return peak + buffer + _GRAPH_OVERHEAD_BYTES * (len(sizes) + len(mixed))

    # ------------------------------------------------------------------ forward
    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """One forward over a flat batch: [num_tokens] ids/positions -> [num_tokens, hidden].

        The seam for CUDA graphs: a step built into the graph runner's static buffer
        (metadata.cuda_graph_size set) replays that size's graph; anything else runs eagerly.
        """
        if metadata.cuda_graph_size is not None and self.graph_runner is not None:
            return self.graph_runner.replay(metadata)
        return self._run_model(input_ids, positions, metadata)

    def _run_model(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The eager forward (also what a CUDA graph captures)."""
        assert self.model is not None, "load_model() first"
        return eager_forward(self.model, input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab] float32."""
        assert self.model is not None, "load_model() first"
        return self.model.compute_logits(hidden)

    def _build_inputs(
        self,
        token_ids: list[list[int]],  # per sequence: its known tokens
        num_computed: list[int],  # per sequence
        num_scheduled: list[int],  # per sequence
        block_tables: list[list[int]],  # per sequence
        logits_indices: np.ndarray,  # [num_logits_rows] rows of the flat batch that need logits
        graph_size: int | None = None,  # pad this decode batch (one token per sequence) to this size
        mixed_graph_size: int | None = None,  # pad this mixed step to this many tokens (and sequences)
    ) -> StepInputs:
        """The flat batch for one step, vectorized over tokens (per-sequence loops only)."""
        logits_indices = logits_indices.astype(np.int64, copy=False)
        if graph_size is not None:
            return self._build_decode_inputs(
                token_ids, num_computed, block_tables, logits_indices, graph_size
            )
        num_seqs = len(token_ids)
        n = np.asarray(num_scheduled, dtype=np.int64)  # [num_seqs]
        computed = np.asarray(num_computed, dtype=np.int64)  # [num_seqs]
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(n, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        # A last token not known yet (still being sampled on the device) is a 0 here; the caller
        # scatters the real id in on the device.
        input_ids = np.fromiter(
            itertools.chain.from_iterable(
                t[c : c + k] if c + k <= len(t) else (*t[c:], 0)
                for t, c, k in zip(token_ids, num_computed, num_scheduled, strict=True)
            ),
            dtype=np.int64,
            count=num_tokens,
        )
        # position of flat token t in sequence s: t - query_start_loc[s] + num_computed[s]
        positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(computed - query_start_loc[:-1], n)
        tables = block_table_array(block_tables, num_seqs)
        seq_idx = np.repeat(np.arange(num_seqs), n)  # [num_tokens]
        block_idx = positions // self.block_size
        slot_mapping = (
            tables[seq_idx, block_idx].astype(np.int64) * self.block_size + positions % self.block_size
        )
        arrays = DecodeArrays(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            seq_lens=(computed + n).astype(np.int32),
            query_start_loc=query_start_loc.astype(np.int32),
            block_tables=tables,
        )
        if mixed_graph_size is not None:
            return self._step_inputs(
                pad_mixed_batch(arrays, mixed_graph_size),
                logits_indices,
                graph_size=mixed_graph_size,
                num_actual_tokens=num_tokens,
                mixed=True,
            )
        return self._step_inputs(arrays, logits_indices, max_query_len=int(n.max(initial=0)))

    def _build_decode_inputs(
        self,
        token_ids: list[list[int]],
        num_computed: list[int],
        block_tables: list[list[int]],
        logits_indices: np.ndarray,
        graph_size: int,
    ) -> StepInputs:
        """A decode-only step (token num_computed[s] of each sequence) padded to graph_size rows.

        The CUDA-graph hot path: plain Python over sequences and a fixed handful of numpy calls, since
        every call costs microseconds of host time the GPU waits for.
        """
        bs = self.block_size
        arrays = pad_decode_batch(
            [t[c] if c < len(t) else 0 for t, c in zip(token_ids, num_computed, strict=True)],
            num_computed,
            [b[c // bs] * bs + c % bs for b, c in zip(block_tables, num_computed, strict=True)],
            [c + 1 for c in num_computed],
            block_table_array(block_tables, graph_size),
            graph_size,
        )
        return self._step_inputs(
            arrays, logits_indices, graph_size=graph_size, num_actual_tokens=len(token_ids)
        )

    def _step_inputs(
        self,
        arrays: DecodeArrays,
        logits_indices: np.ndarray,
        graph_size: int | None = None,
        num_actual_tokens: int | None = None,
        max_seq_len: int | None = None,
        max_query_len: int | None = None,
        mixed: bool = False,
    ) -> StepInputs:
        """Copy a step's arrays to the device; with graph_size, into the graph runner's static buffer
        (CUDAGraphRunner.step_inputs: that size's layout and launch settings)."""
        if graph_size is not None:
            assert self.graph_runner is not None, "no CUDA-graph runner"
            assert num_actual_tokens is not None
            return self.graph_runner.step_inputs(arrays, logits_indices, graph_size, num_actual_tokens, mixed)
        return build_step_inputs(
            input_ids=arrays.input_ids,
            positions=arrays.positions,
            slot_mapping=arrays.slot_mapping,
            block_tables=arrays.block_tables,
            seq_lens=arrays.seq_lens,
            query_start_loc=arrays.query_start_loc,
            logits_indices=logits_indices,
            device=self.device,
            staging=self._staging,
            num_actual_tokens=num_actual_tokens,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
        )

    # ------------------------------------------------------------------ state
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in itertools.chain(so.finished_req_ids, so.preempted_req_ids):
            self.requests.pop(req_id, None)
        for new in so.new_requests:
            self.requests[new.req_id] = self._new_state(new)
        for cached in so.cached_requests:
            state = self.requests.get(cached.req_id)
            if state is None:
                raise RuntimeError(
                    f"scheduler sent a diff for request {cached.req_id!r}, which the runner does not hold"
                )
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.new_token_ids:
                state.token_ids.extend(cached.new_token_ids)
                state.output_token_ids.extend(cached.new_token_ids)

    @staticmethod
    def _new_state(new: NewRequestData) -> _RequestState:
        token_ids = list(new.token_ids)
        num_prompt = new.num_prompt_tokens
        return _RequestState(
            req_id=new.req_id,
            token_ids=token_ids,
            prompt_token_ids=token_ids[:num_prompt],
            output_token_ids=token_ids[num_prompt:],
            sampling_params=new.sampling_params,
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            emit_prompt_logprobs=new.sampling_params.prompt_logprobs is not None
            and len(token_ids) == num_prompt,
            needs_output_ids=new.sampling_params.repetition_penalty != 1.0
            or new.sampling_params.frequency_penalty != 0.0
            or new.sampling_params.presence_penalty != 0.0,
        )

    # ------------------------------------------------------------------ step
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its sampled ids (no step in flight)."""
        return self.execute_model_async(scheduler_output, None).result()

    @torch.inference_mode()
    def execute_model_async(
        self, scheduler_output: SchedulerOutput, previous: StepInFlight | None
    ) -> StepInFlight:
        """Queue one step on the device and return without waiting for its sampled ids.

        `previous` is the step launched before this one, if its results may not be collected yet
        (async scheduling; the step pipeline keeps track). A request whose input token that step is
        still sampling gets it from the step's device tensor. Each step resolves the one before it
        first, so tokens reach the states in launch order whoever calls `result()`.
        """
        prev = previous if previous is not None and not previous.done else None
        self._update_states(scheduler_output)
        scheduled = scheduler_output.num_scheduled_tokens
        output = ModelRunnerOutput(sampled_token_ids={req_id: [] for req_id in scheduled})
        if scheduler_output.total_num_scheduled_tokens == 0 or not scheduled:
            return StepInFlight.finished(output)
        if prev is not None and self._needs_ids_of(prev, scheduled):
            prev.result()  # a penalty reads the output ids: no overlap for this step
            prev = None

        states: list[_RequestState] = []
        num_scheduled: list[int] = []
        sample_rows: list[int] = []  # flat-batch rows whose logits are sampled
        sample_states: list[_RequestState] = []
        num_pending: list[int] = []  # per sampled row: 1 if its input token is still in flight
        pending_dst: list[int] = []  # flat-batch rows whose input id comes from `prev` on the device
        pending_src: list[int] = []  # ... and the row of prev.sampled it comes from
        prompt_rows: list[np.ndarray] = []  # flat-batch rows scored for prompt logprobs
        prompt_targets: list[tuple[_RequestState, list[int]]] = []
        offset = 0
        max_scheduled = 0
        max_num_blocks = 0
        for req_id, n in scheduled.items():
            state = self.requests.get(req_id)
            if state is None:
                raise RuntimeError(f"request {req_id!r} is scheduled but the runner holds no state for it")
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            known = len(state.token_ids)
            if end > known:
                # Only the last scheduled token may be unknown, and only if the step in flight samples it.
                if end > known + 1 or prev is None or req_id not in prev.row_of:
                    raise RuntimeError(
                        f"request {req_id!r}: {n} tokens scheduled from {start}, but only {known} are known"
                    )
                pending_dst.append(offset + n - 1)
                pending_src.append(prev.row_of[req_id])
            if end > len(state.block_ids) * self.block_size:
                raise RuntimeError(
                    f"request {req_id!r}: {len(state.block_ids)} blocks cannot hold {end} tokens"
                )
            states.append(state)
            num_scheduled.append(n)
            max_scheduled = max(max_scheduled, n)
            max_num_blocks = max(max_num_blocks, len(state.block_ids))
            if end >= known:
                sample_rows.append(offset + n - 1)
                sample_states.append(state)
                num_pending.append(end - known)
            if state.emit_prompt_logprobs:
                # position p scores token p + 1; only positions whose next token is a prompt token
                last = min(end, state.num_prompt_tokens - 1)
                if last > start:
                    prompt_rows.append(np.arange(offset, offset + last - start))
                    prompt_targets.append((state, state.token_ids[start + 1 : last + 1]))
            offset += n

        logits_indices = np.concatenate([np.asarray(sample_rows, dtype=np.int64), *prompt_rows])
        graph_size = mixed_graph_size = None
        if self.graph_runner is not None and max_num_blocks <= self.max_blocks_per_seq:
            # None above the largest graph of the kind
            if max_scheduled == 1:
                graph_size = self.graph_runner.padded_size(len(states))
            else:
                mixed_graph_size = self.graph_runner.padded_mixed_size(offset)
        step = self._build_inputs(
            [s.token_ids for s in states],
            [s.num_computed_tokens for s in states],
            num_scheduled,
            [s.block_ids for s in states],
            logits_indices,
            graph_size=graph_size,
            mixed_graph_size=mixed_graph_size,
        )
        if pending_dst:
            assert prev is not None and prev.sampled is not None
            _scatter_rows(step.input_ids, pending_dst, prev.sampled, pending_src)
        hidden = self._forward(step.input_ids, step.positions, step.metadata)
        for state, n in zip(states, num_scheduled, strict=True):
            state.num_computed_tokens += n
        if logits_indices.size == 0:
            return StepInFlight.finished(output)

        # Prompt logprobs in chunks of at most max_num_seqs rows: a whole prompt chunk's logits
        # ([max_num_batched_tokens, vocab] fp32) would be far beyond what the memory profile reserved.
        # (They come back synchronously: rare, and a step that has them is a prefill anyway.)
        row = len(sample_rows)
        chunk = self.max_num_seqs
        for state, targets in prompt_targets:
            num_top = state.sampling_params.prompt_logprobs or 0
            lps: list[TokenLogprobs] = []
            for a in range(0, len(targets), chunk):
                b = min(a + chunk, len(targets))
                prompt_logits = self.compute_logits(hidden[step.logits_indices[row + a : row + b]])
                lps += compute_prompt_logprobs(prompt_logits, targets[a:b], num_top)
            output.prompt_logprobs[state.req_id] = lps
            row += len(targets)

        if not sample_states:
            return StepInFlight.finished(output)
        # [num_sampled, vocab] fp32; the sampled rows come first in logits_indices
        logits = self.compute_logits(hidden[step.logits_indices[: len(sample_states)]])
        rows = [
            SamplingRow(
                params=s.sampling_params,
                prompt_token_ids=s.prompt_token_ids,
                output_token_ids=s.output_token_ids,
                num_pending_outputs=p,
            )
            for s, p in zip(sample_states, num_pending, strict=True)
        ]
        md = build_sampling_metadata(rows, vocab_size=self.vocab_size, device=self.device)
        sampled, packed_logprobs = self.sampler.sample(logits, md)
        return StepInFlight.launch(output, sampled, packed_logprobs, sample_states, md, previous=prev)

    def _needs_ids_of(self, prev: StepInFlight, scheduled: dict[str, int]) -> bool:
        """True when a scheduled request that waits on `prev`'s token must see the id on the host."""
        for req_id in prev.row_of:
            state = self.requests.get(req_id)
            if state is not None and state.needs_output_ids and req_id in scheduled:
                return True
        return False


def _scatter_rows(input_ids: torch.Tensor, dst: list[int], sampled: torch.Tensor, src: list[int]) -> None:
    """input_ids[dst] = sampled[src] on the device: feed tokens still in flight to the next step.

    In steady decoding the batch keeps its order, so both index lists are 0..k-1: one slice copy,
    no index tensors to transfer.
    """
    k = len(dst)
    if dst[0] == 0 and src[0] == 0 and dst[-1] == k - 1 and src[-1] == k - 1 and dst == src == list(range(k)):
        input_ids[:k].copy_(sampled[:k])
        return
    index = torch.tensor([dst, src], dtype=torch.int64)
    if input_ids.device.type == "cuda":
        index = index.pin_memory().to(input_ids.device, non_blocking=True)
    input_ids[index[0]] = sampled[index[1]]
