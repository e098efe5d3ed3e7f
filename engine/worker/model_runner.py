"""The model runner: owns the model, the KV caches and the per-request state, and turns one
SchedulerOutput into one ModelRunnerOutput. Only what every model and step needs lives here; each
concern keeps its own module:

- engine.worker.input_batch: the per-request state, the scheduler's diff applied to it, the walk over
  the scheduled requests and the flat batch's host arrays (input ids, positions, slot mapping, block
  tables); engine.worker.block_table_rows: the block tables kept as rows written as blocks come, so a
  step gathers its table instead of rebuilding it from every request's list;
- engine.worker.attention_metadata: the step's device inputs (`build_step_inputs`, one copy through a
  reused pinned buffer) and the forward context the attention layers read;
- engine.worker.cuda_graphs: decode-only steps of up to max_cuda_graph_batch_size sequences (and mixed
  steps up to max_cuda_graph_mixed_tokens) padded to a captured size and replayed;
- engine.worker.sampler: sampling metadata and the sampler; engine.worker.step_in_flight: a launched
  step whose sampled ids are still on the device;
- engine.worker.kv_cache_setup: sizing (a profile forward on CUDA), allocating and binding the KV caches,
  then capturing the CUDA graphs over them; engine.worker.memory_profile: the profile's accounting.

Hot path. Per step: apply the scheduler's diff (`update_states`), walk the scheduled requests once
(`gather_scheduled`), build the flat batch and copy it to the device (`_build_inputs`), run the forward
(`_forward`, the seam where a captured graph replaces the eager forward), project only the rows that
need logits (the last scheduled token of requests that reach the end of their known tokens, plus
prompt positions of requests asking for prompt logprobs, in chunks of max_num_seqs rows), and sample
them without waiting for the device. Each helper is called once per step, never per request.

Host syncs per step: none inside `execute_model_async`; the sampled ids (and logprobs) come back
through a non_blocking copy that `StepInFlight.result()` waits for. A decode whose input token is
still being sampled by the previous step reads it from that step's device tensor (`scatter_rows`), so
the engine can schedule and launch step N+1 before step N's ids reach the host. Prompt logprobs and
penalties over a token in flight are the exceptions that wait.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.config import ResolvedConfig
from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from engine.lora.request import LoRARequest
from engine.model.build_context import BuildContext
from engine.model.layers.attention import Attention
from engine.model.layers.attention_backend import AttentionBackend, get_attention_backend
from engine.model.models.registry import get_model_class
from engine.model.quantization import QuantizationConfig
from engine.model.quantization.act_order_folding import fold_down_proj_orders
from engine.model.quantization.kv_cache import load_kv_cache_scales
from engine.model.quantization.l2_prefetch_chain import (
    l2_prefetch_bytes,
    l2_prefetch_enabled,
    link_l2_prefetch,
)
from engine.model.weight_loader import find_safetensors_files, initialize_dummy_weights, load_weights
from engine.worker import compile_pool
from engine.worker.attention_metadata import (
    AttentionMetadata,
    PinnedStaging,
    StepInputs,
    build_step_inputs,
    eager_forward,
)
from engine.worker.beam_device import BeamRows, DeviceBeamPool
from engine.worker.block_copy import copy_kv_blocks
from engine.worker.block_table_rows import BlockTableRows
from engine.worker.cuda_graphs import (
    CUDAGraphRunner,
    DecodeArrays,
    capture_sizes,
    mixed_capture_sizes,
    pad_mixed_batch,
)
from engine.worker.input_batch import (
    RequestState,
    decode_batch_arrays,
    flat_batch_arrays,
    gather_scheduled,
    update_states,
)
from engine.worker.kv_cache_setup import KVCacheSetup
from engine.worker.sampler import (
    Sampler,
    SamplingRow,
    build_sampling_metadata,
    compute_prompt_logprobs,
    row_constants,
)
from engine.worker.step_in_flight import StepInFlight, scatter_rows
from ops.env_flags import check_env_flags

if TYPE_CHECKING:
    from engine.lora.manager import LoRAManager

logger = logging.getLogger("weir.engine")


def _drop_weight_loaders(model: torch.nn.Module) -> None:
    """Remove the `weight_loader` attributes from the parameters once loading is done.

    A loader is often its layer's bound method stored on the layer's own parameter: a reference cycle
    per layer (layer -> parameter -> bound method -> layer), which kept a dropped engine's weights on
    the device until the next garbage collection.
    """
    for param in model.parameters():
        param.__dict__.pop("weight_loader", None)


class ModelRunner(KVCacheSetup):
    def __init__(self, config: ResolvedConfig, rank: int = 0, device_index: int | None = None) -> None:
        """`rank`: this runner's tensor-parallel rank (of config.parallel.tensor_parallel_size; its
        process group is already initialised when > 1). `device_index`: its CUDA device (None: the
        current one)."""
        check_env_flags()  # a tuning switch set to anything but 0 or 1 fails here, naming it
        self.config = config
        self.rank = rank
        self.model_config = model_config = config.model
        self.device = torch.device(config.device.device, device_index)
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
        # [num_layers, 2, num_blocks, ...]: every layer's K and V cache, when they share one shape.
        self.kv_cache_stack: torch.Tensor | None = None
        self.num_kv_blocks = 0
        self.requests: dict[str, RequestState] = {}
        # Their block tables as rows of one array, written as blocks come (engine/worker/block_table_rows.py).
        self.block_rows = BlockTableRows(self.max_blocks_per_seq, capacity=self.max_num_seqs)
        self.sampler = Sampler()
        self.graph_runner: CUDAGraphRunner | None = None
        self._staging = PinnedStaging() if self.device.type == "cuda" else None
        # Start-up seconds by phase (the engine's start-up phases and the start-up benchmark read them).
        self.timings: dict[str, float] = {
            "model_build_s": 0.0,  # the attention backend and the model's layers
            "weights_load_s": 0.0,  # the weights (or dummy values), post-load hooks, LoRA slots
            "profile_s": 0.0,
            "kv_alloc_s": 0.0,
            "cuda_graph_capture_s": 0.0,
        }
        # GiB figures of the CUDA memory profile (empty on CPU or with num_kv_blocks set).
        self.memory_profile: dict[str, float] = {}
        # Per start-up phase, what the compile pool did (engine.worker.compile_ahead; empty without it).
        self.compile_ahead_figures: dict[str, dict[str, float]] = {}
        self._startup_kernels_key: str | None = None  # engine.worker.compile_marker's, once computed
        torch.manual_seed(config.load.seed)
        self.attn_backend: AttentionBackend | None = None  # chosen once, in load_model
        self.lora: LoRAManager | None = None  # adapters, slots, per-token index (config.lora set)
        self._beam_pool: DeviceBeamPool | None = None  # device-ranked beam groups' rows (on first use)

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
        if self.device.type == "cuda" and self.config.parallel.tensor_parallel_size == 1:
            # No-op if `weir serve` started it already, or it is off.
            compile_pool.start(compile_pool.workers_from_env())
        self.attn_backend = get_attention_backend(
            self.device,
            self.dtype,
            self.kv_cache_dtype,
            self.model_config.head_dim,
            self.block_size,
            use_triton,
        )
        self.sampler = Sampler(self.attn_backend.kernels)
        model_cls = get_model_class(self.model_config.architecture)
        ctx = BuildContext(
            dtype=self.dtype,
            quant_config=quant_config,
            attn_backend=self.attn_backend,
            tp_rank=self.rank,
            tp_size=self.config.parallel.tensor_parallel_size,
        )
        with torch.device(self.device):
            model = model_cls(self.model_config, ctx)
        self._sync()
        built = time.perf_counter()
        self.timings["model_build_s"] = built - start
        if self.config.load.load_format == "dummy":
            initialize_dummy_weights(model, seed=self.config.load.seed)
        else:
            load_weights(model, self.model_config.model_path)
            if self.kv_cache_dtype.itemsize == 1:  # fp8 cache: the checkpoint's k/v scales, if any
                files = find_safetensors_files(self.model_config.model_path)
                logger.info(
                    "KV-cache scales from the checkpoint: %d layers", load_kv_cache_scales(model, files)
                )
        model.eval()
        if self.config.lora is None:  # with LoRA an adapter's rows would need the same reorder
            folded = fold_down_proj_orders(model)
            if folded:
                logger.info("act order: %d down_proj input gathers folded into gate_up_proj's rows", folded)
        self._link_l2_prefetch(model)
        _drop_weight_loaders(model)
        self.model = model
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        if self.config.lora is not None:
            from engine.lora.manager import LoRAManager  # noqa: PLC0415  (only with LoRA on)

            mixed = self.cuda_graph_mixed_sizes()
            max_tokens = max(self.max_num_batched_tokens, self.cuda_graph_sizes()[-1], *mixed[-1:])
            self.lora = LoRAManager(
                model, self.config.lora, self.attn_backend.kernels, self.device, self.dtype, max_tokens
            )
        self._sync()
        self.timings["weights_load_s"] = time.perf_counter() - built
        num_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "loaded %s (%.1fM parameters, %s, %s, %s attention) in %.2fs (layers %.2fs, weights %.2fs)",
            self.model_config.architecture,
            num_params / 1e6,
            self.dtype,
            self.device,
            self.attn_backend.name,
            time.perf_counter() - start,
            self.timings["model_build_s"],
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
        self.kv_cache_stack = None
        self.num_kv_blocks = 0
        self.model = None
        self.lora = None
        self.requests.clear()
        self.block_rows = BlockTableRows(self.max_blocks_per_seq, capacity=self.max_num_seqs)
        self._beam_pool = None
        self._staging = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _link_l2_prefetch(self, model: torch.nn.Module) -> None:
        """WEIR_L2_PREFETCH=1 (sm_90): each projection's decode GEMV asks L2 for the next one's weights
        (engine/model/quantization/l2_prefetch_chain.py); off by default: on an H200 it made L1's
        batch-1 step 4.8% slower (README, Configuration)."""
        max_bytes = l2_prefetch_bytes()  # (a bad value is refused on any device)
        if not l2_prefetch_enabled(self.device):
            return
        linked = link_l2_prefetch(model, max_bytes)
        logger.info("L2 prefetch: %d projections ask for the next one's weights", linked)

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
        tables: np.ndarray | None = None,  # block_tables as [graph_size or num_seqs, longest] int32, if built
    ) -> StepInputs:
        """The step's flat batch (engine.worker.input_batch), on the device."""
        logits_indices = logits_indices.astype(np.int64, copy=False)
        if graph_size is not None:
            arrays = decode_batch_arrays(
                token_ids, num_computed, block_tables, self.block_size, graph_size, tables
            )
            return self._step_inputs(
                arrays, logits_indices, graph_size=graph_size, num_actual_tokens=len(token_ids)
            )
        arrays, max_query_len = flat_batch_arrays(
            token_ids, num_computed, num_scheduled, block_tables, self.block_size, tables
        )
        if mixed_graph_size is not None:
            return self._step_inputs(
                pad_mixed_batch(arrays, mixed_graph_size),
                logits_indices,
                graph_size=mixed_graph_size,
                num_actual_tokens=int(arrays.input_ids.shape[0]),
                mixed=True,
            )
        return self._step_inputs(arrays, logits_indices, max_query_len=max_query_len)

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
            find_fresh_prompts=self.attn_backend is not None and self.attn_backend.flash_prefill is not None,
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
        update_states(self.requests, scheduler_output, self.block_rows)
        if scheduler_output.block_copies:
            copy_kv_blocks(self.kv_caches, scheduler_output.block_copies, self.kv_cache_stack)
        beams = self._beam_rows(scheduler_output)
        if self.lora is not None:
            for new in scheduler_output.new_requests:
                if new.lora_request is not None:
                    self.requests[new.req_id].lora = self.lora.add(new.lora_request)
        scheduled = scheduler_output.num_scheduled_tokens
        output = ModelRunnerOutput(sampled_token_ids={req_id: [] for req_id in scheduled})
        if scheduler_output.total_num_scheduled_tokens == 0 or not (scheduled or beams):
            return StepInFlight.finished(output)
        if self.lora is not None:
            scheduled = self.lora.group_by_adapter(self.requests, scheduled)
        if prev is not None and self._needs_ids_of(prev, scheduled):
            prev.result()  # a penalty reads the output ids: no overlap for this step
            prev = None

        batch = gather_scheduled(
            self.requests,
            scheduled,
            prev.row_of if prev is not None else None,
            self.block_size,
            self.block_rows,
        )
        states, num_scheduled, sample_states = batch.states, batch.num_scheduled, batch.sample_states
        logits_indices = np.concatenate([np.asarray(batch.sample_rows, dtype=np.int64), *batch.prompt_rows])
        # The device-ranked beams' rows go after every other sequence, one token each; their input
        # ids and full blocks are placeholders here, which the pool fills in on the device (feed).
        token_ids = [s.token_ids for s in states]
        num_computed = [s.num_computed_tokens for s in states]
        block_tables = [s.block_ids for s in states]
        num_seqs, num_tokens = len(states), batch.num_tokens
        max_scheduled, max_num_blocks = batch.max_scheduled, batch.max_num_blocks
        lora_rows = [s.lora for s in states]
        row_tokens = num_scheduled
        if beams is not None:
            n = beams.num_rows
            token_ids = token_ids + [[]] * n
            num_computed = num_computed + beams.positions
            block_tables = block_tables + beams.host_tables
            row_tokens = num_scheduled + [1] * n
            lora_rows += beams.adapters
            num_seqs += n
            num_tokens += n
            max_scheduled = max(max_scheduled, 1)
            max_num_blocks = max(max_num_blocks, max(map(len, beams.host_tables)))
        graph_size = mixed_graph_size = None
        if self.graph_runner is not None and max_num_blocks <= self.max_blocks_per_seq:
            # None above the largest graph of the kind
            if max_scheduled == 1:
                graph_size = self.graph_runner.padded_size(num_seqs)
            else:
                mixed_graph_size = self.graph_runner.padded_mixed_size(num_tokens)
        if self.lora is not None:
            padded = graph_size or mixed_graph_size or num_tokens
            self.lora.prepare_step(lora_rows, row_tokens, padded)
        # The block tables from the runner's rows (one gather), unless beams' rows follow the sequences'.
        tables = None
        if beams is None:
            tables = self.block_rows.gather(batch.table_rows, graph_size or num_seqs, max_num_blocks)
        step = self._build_inputs(
            token_ids,
            num_computed,
            row_tokens,
            block_tables,
            logits_indices,
            graph_size=graph_size,
            mixed_graph_size=mixed_graph_size,
            tables=tables,
        )
        if batch.pending_dst:
            assert prev is not None and prev.sampled is not None
            scatter_rows(step.input_ids, batch.pending_dst, prev.sampled, batch.pending_src)
        if beams is not None:
            assert self._beam_pool is not None
            self._beam_pool.feed(beams, step, batch.num_tokens, len(states))
        hidden = self._forward(step.input_ids, step.positions, step.metadata)
        for state, n in zip(states, num_scheduled, strict=True):
            state.num_computed_tokens += n
        beam_results = None
        if beams is not None:
            assert self._beam_pool is not None
            beam_logits = self.compute_logits(hidden[batch.num_tokens : batch.num_tokens + beams.num_rows])
            beam_results = self._beam_pool.rank(beams, beam_logits)
        if logits_indices.size == 0:
            return StepInFlight.launch_beams(output, beam_results, previous=prev)

        # Prompt logprobs in chunks of at most max_num_seqs rows: a whole prompt chunk's logits
        # ([max_num_batched_tokens, vocab] fp32) would be far beyond what the memory profile reserved.
        # (They come back synchronously: rare, and a step that has them is a prefill anyway.)
        row = len(sample_states)
        chunk = self.max_num_seqs
        for state, targets in batch.prompt_targets:
            num_top = state.sampling_params.prompt_logprobs or 0
            lps: list[TokenLogprobs] = []
            for a in range(0, len(targets), chunk):
                b = min(a + chunk, len(targets))
                prompt_logits = self.compute_logits(hidden[step.logits_indices[row + a : row + b]])
                lps += compute_prompt_logprobs(prompt_logits, targets[a:b], num_top)
            output.prompt_logprobs[state.req_id] = lps
            row += len(targets)

        if not sample_states:
            return StepInFlight.launch_beams(output, beam_results, previous=prev)
        # [num_sampled, vocab] fp32; the sampled rows come first in logits_indices
        logits = self.compute_logits(hidden[step.logits_indices[: len(sample_states)]])
        rows = []
        for s, p in zip(sample_states, batch.num_pending, strict=True):
            constants = s.sampling_constants
            if constants is None:  # once a request: its params never change
                constants = s.sampling_constants = row_constants(s.sampling_params, self.vocab_size)
            rows.append(SamplingRow(s.sampling_params, s.prompt_token_ids, s.output_token_ids, p, constants))
        md = build_sampling_metadata(rows, vocab_size=self.vocab_size, device=self.device)
        sampled, packed_logprobs = self.sampler.sample(logits, md)
        return StepInFlight.launch(
            output, sampled, packed_logprobs, sample_states, md, previous=prev, beams=beam_results
        )

    def _beam_rows(self, so: SchedulerOutput) -> BeamRows | None:
        """The step's device-ranked beam rows, moved to their parents' sequences (None: none)."""
        if not (so.beam_steps or so.finished_beam_groups):
            return None
        if self._beam_pool is None:
            self._beam_pool = DeviceBeamPool(
                self.max_num_seqs, self.max_blocks_per_seq, self.block_size, self.device
            )
        return self._beam_pool.prepare(
            so.finished_beam_groups,
            so.beam_steps,
            self.kv_caches,
            self.kv_cache_stack,
            self.lora.add if self.lora is not None else None,
        )

    def _needs_ids_of(self, prev: StepInFlight, scheduled: dict[str, int]) -> bool:
        """True when a scheduled request that waits on `prev`'s token must see the id on the host."""
        for req_id in prev.row_of:
            state = self.requests.get(req_id)
            if state is not None and state.needs_output_ids and req_id in scheduled:
                return True
        return False

    # ------------------------------------------------------------------ LoRA
    def _lora_manager(self) -> LoRAManager:
        if self.lora is None:
            raise ValueError("LoRA is off: build the engine with enable_lora=True to serve adapters")
        return self.lora

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load and check an adapter into the host cache (raises LoRAAdapterError)."""
        self._lora_manager().add(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drop an adapter from the host cache; requests running on it finish with it."""
        return self._lora_manager().remove(lora_int_id)
