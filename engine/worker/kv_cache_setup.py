"""The model runner's KV-cache set-up, in the order the engine calls it: size the cache
(`determine_num_kv_blocks`: config, CPU budget or a CUDA memory profile of the largest step the
scheduler may send), allocate and bind it to the attention layers (`initialize_kv_cache`), then capture
the CUDA graphs over it (their static inputs hold the caches' addresses, so they come after).

A mixin of engine.worker.model_runner.ModelRunner: it reads the runner's configuration, model and
attention layers, and runs its step-building and forward methods for the profile.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import torch

from engine.model.quantization.float_gemv import decode_gemv_allowed
from engine.worker import compile_marker, compile_pool
from engine.worker.attention_metadata import eager_forward
from engine.worker.compile_ahead import compile_ahead, representative_sizes
from engine.worker.cuda_graphs import CUDAGraphRunner, pad_decode_batch
from engine.worker.memory_profile import (
    choose_num_kv_blocks,
    kv_block_bytes,
    profile_graph_pool_bytes,
    profile_kv_cache_bytes,
    profile_seq_lens,
    worst_case_sampling_rows,
)
from engine.worker.sampler import build_sampling_metadata

logger = logging.getLogger("weir.engine")


class KVCacheSetup:
    """Mixed into ModelRunner, whose __init__ sets every attribute used here."""

    @property
    def bytes_per_kv_block(self) -> int:
        """K and V of one block across every layer."""
        cfg = self.model_config
        num_kv_heads = self.attn_layers[0].num_kv_heads if self.attn_layers else cfg.num_kv_heads
        return kv_block_bytes(
            cfg.num_layers, self.block_size, num_kv_heads, cfg.head_dim, self.kv_cache_dtype
        )

    def determine_num_kv_blocks(self) -> int:
        """config.num_kv_blocks if set; on CPU from cpu_kv_cache_gb; on CUDA from a profile forward
        (engine.worker.memory_profile)."""
        start = time.perf_counter()
        num_blocks = choose_num_kv_blocks(
            self.config.cache,
            self.device,
            self.block_size,
            self.bytes_per_kv_block,
            self._profile_num_kv_blocks,
        )
        self.timings["profile_s"] = time.perf_counter() - start
        return num_blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache, then capture the CUDA graphs over it (CUDA, unless enforce_eager)."""
        start = time.perf_counter()
        try:
            self._allocate_kv_cache(num_blocks)
        except RuntimeError as exc:  # torch.OutOfMemoryError too; CPU's allocator raises RuntimeError
            # A cpu_kv_cache_gb or num_kv_blocks past the memory there is ended start-up in the
            # allocator's "[enforce fail at alloc_cpu.cpp:127] ..." naming no option.
            cache = self.config.cache
            source = (
                f"num_kv_blocks {cache.num_kv_blocks_override}"
                if cache.num_kv_blocks_override is not None
                else f"cpu_kv_cache_gb {cache.cpu_kv_cache_gb}"
                if self.device.type == "cpu"
                else f"gpu_memory_utilization {cache.gpu_memory_utilization}"
            )
            gib = num_blocks * self.bytes_per_kv_block / 2**30
            raise ValueError(
                f"cannot allocate the KV cache: {num_blocks} blocks of {self.bytes_per_kv_block} bytes "
                f"({gib:.1f} GiB, from {source}) do not fit in memory; lower it"
            ) from exc
        self._sync()
        self.timings["kv_alloc_s"] = time.perf_counter() - start
        try:
            self.capture_cuda_graphs()
        finally:
            compile_pool.stop()  # start-up's compiles are done: the workers exit
        if self._launches_triton_on_cuda():  # every kernel this start-up launched is in the cache now
            try:
                compile_marker.mark_compiled(self._kernels_key())
            except Exception:  # the marker only saves the next start the pool: never fail this one
                logger.warning("compile pool: could not leave this start-up's marker", exc_info=True)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        """Per-layer K and V caches in the attention backend's shape and dtype ([num_blocks, block_size,
        num_kv_heads, head_dim] for both backends today), bound to the attention layers. Zero-filled so
        kernels never read NaN garbage from unused slots."""
        self.graph_runner = None  # graphs hold the old caches' addresses
        self.kv_caches = []
        self.kv_cache_stack = None
        backend = self.attn_backend
        assert backend is not None, "load_model() first"
        dtype = backend.kv_cache_dtype
        shapes = [
            backend.kv_cache_shape(num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            for layer in self.attn_layers
        ]
        if shapes and all(shape == shapes[0] for shape in shapes):
            # One tensor [num_layers, 2, *shape]: each layer's K and V are contiguous views of it (the
            # layout they had alone), and a step's copy-on-write block copies are one gather and one
            # scatter over every layer (engine/worker/block_copy.py) instead of two per cache.
            stack = torch.zeros((len(shapes), 2, *shapes[0]), dtype=dtype, device=self.device)
            self.kv_cache_stack = stack
            caches = [(stack[i, 0], stack[i, 1]) for i in range(len(shapes))]
        else:
            caches = [
                (
                    torch.zeros(shape, dtype=dtype, device=self.device),
                    torch.zeros(shape, dtype=dtype, device=self.device),
                )
                for shape in shapes
            ]
        for layer, (k_cache, v_cache) in zip(self.attn_layers, caches, strict=True):
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
            lora=self.lora.batch if self.lora is not None else None,
            compile_ahead=self._compiles_ahead(),
        )
        graph_runner.capture()
        if graph_runner.compile_ahead_figures:
            self.compile_ahead_figures["cuda graphs"] = graph_runner.compile_ahead_figures
        self.graph_runner = graph_runner
        self.timings["cuda_graph_capture_s"] = graph_runner.capture_seconds

    @torch.inference_mode()
    def _profile_num_kv_blocks(self) -> int:
        """Run the largest step the scheduler may send (max_num_batched_tokens, plus logits and every
        sampler stage for up to max_num_seqs rows) and the largest captured decode batch on a temporary
        cache under the memory profile; give the KV cache the rest of total * gpu_memory_utilization."""
        num_tokens = self.max_num_batched_tokens
        seq_lens = profile_seq_lens(num_tokens, self.max_model_len)
        blocks_per_seq = [-(-n // self.block_size) for n in seq_lens]
        num_blocks = sum(blocks_per_seq)

        def allocate_temp_cache() -> int:
            self._allocate_kv_cache(num_blocks)
            return num_blocks * self.bytes_per_kv_block

        num_rows = min(self.max_num_seqs, num_tokens)

        def profile_forward() -> torch.Tensor:  # -> logits [num_rows, vocab]
            block_ids = iter(range(num_blocks))
            token_ids = [[0] * n for n in seq_lens]
            tables = [[next(block_ids) for _ in range(b)] for b in blocks_per_seq]
            step = self._build_inputs(
                token_ids, [0] * len(seq_lens), seq_lens, tables, np.arange(num_tokens - num_rows, num_tokens)
            )
            hidden = self._forward(step.input_ids, step.positions, step.metadata)
            return self.compute_logits(hidden[step.logits_indices])

        def sample(logits: torch.Tensor) -> None:
            rows = worst_case_sampling_rows(num_rows)
            self.sampler(
                logits, build_sampling_metadata(rows, vocab_size=self.vocab_size, device=self.device)
            )

        def peak_step() -> None:
            sample(profile_forward())

        def free_temp_cache() -> None:
            for layer in self.attn_layers:
                layer.k_cache = layer.v_cache = None
            self.kv_caches = []
            self.kv_cache_stack = None
            self.num_kv_blocks = 0

        if self._compiles_ahead():
            # The profile's kernels (and, at the sizes that choose kernel variants, the graph
            # warm-ups') compiled in the pool while the sampler's compile here, on zero logits.
            allocate_temp_cache()
            try:
                self.compile_ahead_figures["memory profile"] = compile_ahead(
                    "memory profile",
                    [profile_forward]
                    + [
                        functools.partial(self._padding_decode_forward, bs)
                        for bs in representative_sizes(self.cuda_graph_sizes())
                    ],
                    meanwhile=lambda: sample(
                        torch.zeros(num_rows, self.vocab_size, dtype=torch.float32, device=self.device)
                    ),
                )
            finally:
                free_temp_cache()
        available, self.memory_profile = profile_kv_cache_bytes(
            self.device,
            self.config.cache.gpu_memory_utilization,
            num_tokens,
            allocate_temp_cache,
            peak_step,
            self._profile_cuda_graph_bytes if self.use_cuda_graphs else None,
            free_temp_cache,
        )
        return max(int(available // self.bytes_per_kv_block), 0)

    def _profile_cuda_graph_bytes(self) -> int:
        """The graph pool estimate (memory_profile.profile_graph_pool_bytes), from an eager forward of
        the largest captured decode batch on the profile's temporary cache (padding rows only)."""
        sizes = self.cuda_graph_sizes()

        def largest_decode_forward() -> None:
            self._padding_decode_forward(sizes[-1], allow_gemv=False)

        return profile_graph_pool_bytes(
            self.device,
            largest_decode_forward,
            sizes,
            self.cuda_graph_mixed_sizes(),
            self.max_blocks_per_seq,
            graphs_per_size=2 if self.lora is not None else 1,  # with and without the LoRA term
        )

    def _padding_decode_forward(self, batch_size: int, allow_gemv: bool = True) -> None:
        """An eager forward of a decode batch of padding rows only (they read no KV and store none).
        `allow_gemv`: batch-1 linears may take the Triton GEMV, as inside the CUDA graphs."""
        empty = np.zeros(0, dtype=np.int64)
        arrays = pad_decode_batch(
            empty, empty, empty, empty.astype(np.int32), np.zeros((0, 1), np.int32), batch_size
        )
        step = self._step_inputs(arrays, np.zeros(0, dtype=np.int64), max_seq_len=self.max_model_len)
        if allow_gemv and self.use_cuda_graphs:
            with decode_gemv_allowed():
                self._forward(step.input_ids, step.positions, step.metadata)
        else:
            self._forward(step.input_ids, step.positions, step.metadata)

    def _compiles_ahead(self) -> bool:
        """Whether start-up's Triton compiles go to the compile pool (engine.worker.compile_ahead): the
        pool is running and this runner launches Triton kernels on a GPU, alone (with tensor
        parallelism the ranks' forwards meet in collectives: one rank's dry forwards would wait for
        the others forever), and no start-up like this one has filled the Triton cache before
        (engine.worker.compile_marker: then the workers are ended at once)."""
        if not (
            compile_pool.running() > 0
            and self.config.parallel.tensor_parallel_size == 1
            and self._launches_triton_on_cuda()
        ):
            return False
        try:
            cached = compile_marker.compiled_before(self._kernels_key())
        except Exception:  # the pool as without the marker
            logger.warning("compile pool: could not look for this start-up's marker", exc_info=True)
            cached = False
        if cached:
            logger.info(
                "compile pool: not used, this start-up's Triton kernels are in the cache (%s)",
                compile_marker.marker_path(self._kernels_key()),
            )
            compile_pool.stop(terminate=True)
            return False
        return True

    def _launches_triton_on_cuda(self) -> bool:
        backend = self.attn_backend
        return self.device.type == "cuda" and backend is not None and backend.kernels.name == "triton"

    def _kernels_key(self) -> str:
        """compile_marker's key of this start-up, computed once (before the KV cache is sized)."""
        if self._startup_kernels_key is None:
            capability = torch.cuda.get_device_capability(self.device)
            self._startup_kernels_key = compile_marker.startup_key(self.config, capability)
        return self._startup_kernels_key
