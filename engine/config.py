"""Engine configuration: the user's options (`EngineConfig`), validated at the edge, and the one
place they are resolved (`EngineConfig.resolve`) into frozen sub-configs (`ResolvedConfig`).

`EngineConfig` is what `LLM(...)`, `AsyncEngine` and `weir serve` all build; its field names and
defaults are the user-facing options (README's configuration table). Fields left None are filled in
by `resolve()` from the checkpoint (`max_model_len`) and the device (batch limits, CUDA-graph sizes).
Nothing downstream re-resolves an option or writes one back; the single value set later is the KV
cache's size, known after the runner profiled memory (`ResolvedConfig.with_num_kv_blocks`), which
also caps `scheduler.max_model_len` to what the cache can hold (for a model windowed on every layer:
only if a sequence's window and chunk do not fit, engine/core/sliding_window.py).

Plain Python: torch is imported only to resolve device/dtype "auto".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from engine.core.sliding_window import max_blocks_held
from engine.lora.request import valid_fair_weight
from engine.model_config import ModelConfig, resolve_device

logger = logging.getLogger("weir.engine")

VALID_DTYPES = ("auto", "float32", "float16", "bfloat16")
VALID_DEVICES = ("auto", "cpu", "cuda")
VALID_LOAD_FORMATS = ("auto", "safetensors", "dummy")
VALID_BLOCK_SIZES = (8, 16, 32, 64)
VALID_SCHEDULING_POLICIES = ("fcfs", "fair")
# engine.model.quantization.detect.QUANTIZATION_METHODS
VALID_QUANTIZATIONS = ("gptq", "awq", "fp8", "squeezellm", "compressed-tensors")
VALID_EXECUTOR_BACKENDS = ("mp", "ray")
# Bounds of the tensor-parallel broadcast ring: its header stores both in 32 bits, and the whole ring
# lives in /dev/shm (checked against its free space when the executor starts).
MAX_TP_BROADCAST_SLOTS = 4096
MAX_TP_BROADCAST_SLOT_BYTES = 1 << 30
# fit_mixed_steps_to_cuda_graphs cuts prompts beside decodes while their backlog is at most this many
# tokens (or one step, if larger). Measured on an H200 (S1 at 16 req/s, 1,024-token prompts): with the
# server's 2,048-token steps a one-step limit let three waiting prompts turn the cut off, and ITL p99
# rose from 15.2 to 20.6 ms; 8,192 is the limit those 15.2 ms were measured with (the old step size).
MIXED_STEP_FIT_BACKLOG_TOKENS = 8192
# kv_cache_dtype -> the caches' torch dtype name (auto: the model's). "fp8" is e4m3, as in vLLM.
KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


@dataclass(slots=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None  # defaults to model
    dtype: str = "auto"  # auto: bfloat16 on cuda (float16 if unsupported), float32 on cpu
    device: str = "auto"  # auto: cuda when available
    seed: int = 0
    load_format: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings (yarn: scaled, rope_fields)
    block_size: int = 16
    # auto: the model dtype; fp8 / fp8_e4m3 / fp8_e5m2: 1-byte K/V with per-tensor or per-head scales (the
    # checkpoint's k_scale / v_scale, else 1.0): half a bf16 cache's bytes, twice the blocks
    kv_cache_dtype: str = "auto"
    # None: what the checkpoint's quantization config says (or unquantized); else the method, which
    # must agree with the checkpoint's (engine.model.quantization.detect)
    quantization: str | None = None
    num_kv_blocks: int | None = None  # None: from gpu_memory_utilization (cuda) or cpu_kv_cache_gb
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 1.0
    max_num_seqs: int | None = None  # None: 1024 on cuda (as vLLM on large GPUs), 256 on cpu
    # None: on cuda 2048 for `weir serve` (usage "server"), max(8192, max_model_len) offline; 512 on cpu
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs
    # Schedule and launch step N+1 while the device still runs step N (its sampled ids are fed to
    # N+1 on the device); the host's bookkeeping then hides behind GPU time. False: one step at a time.
    async_scheduling: bool = True
    max_cuda_graph_batch_size: int | None = None  # None: 1024 (decode batches above run eagerly)
    # Mixed prefill+decode steps of up to this many tokens replay CUDA graphs too (sizes 16, 32, 64,
    # ... up to it); 0: they run eagerly. None: 512 on cuda. Small mixed steps (a short prompt
    # arriving among a few dozen decodes) are where an eager forward's ~18 ms of launches (8B model)
    # dwarfs the GPU work; above ~1k tokens the GPU work hides the launches and padding to the next
    # graph size would only add compute (measured: loadtest/results/chat-mixed-h200-*).
    max_cuda_graph_mixed_tokens: int | None = None
    # One request's prompt chunk per step, in tokens (vLLM's name); 0: up to the step's whole budget.
    # A long prompt then takes several steps, and the decodes that share them wait less: under load,
    # the inter-token latency's tail falls, and time to first token of long prompts rises.
    long_prefill_token_threshold: int = 0
    # Decodes in the step: a prompt's chunk is cut so the step fits the largest mixed CUDA graph, while
    # the prompts' backlog is short (8,192 tokens or one full step; light load). S1 at 16 req/s on an H200: ITL p99 31 -> 15 ms,
    # TTFT p50 41 -> 48 ms (loadtest/results/suite-h200-2026-12-03-*). Nothing to fit without mixed graphs.
    fit_mixed_steps_to_cuda_graphs: bool = True
    # Admission keeps free KV blocks for each running request's next this-many tokens (fewer where its
    # max_tokens ends sooner) and for the rest of every admitted prompt, so running requests grow
    # without preempting one another (a preempted request recomputes its whole context); 0: admit
    # whenever the next prompt chunk fits (vLLM's policy). With an H100's cache, T2 ran 44 preemptions
    # and computed ~45,000 prompt tokens twice without it; modelled (loadtest/sim_admission.py), 128
    # removes them (T2 -1.8%; chat-like loads with unknown output lengths -1.1% to -14.4%), while much
    # larger reserves admit too few (1,024: up to +38% against none, on a tight cache). Not yet measured
    # on a GPU (loadtest/results/admission-sim-cpu-2026-12-08/).
    admission_reserve_tokens: int = 128
    # Admission control (serving): beyond these the server answers 429 instead of queueing.
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1_048_576
    # The most sequences a best_of > n request may generate (OpenAI's own limit). best_of samples
    # cost best_of sequences' KV and compute for n answers: unbounded, one request could take the
    # server (the class of vLLM's CVE-2024-8939).
    max_best_of: int = 20
    # The widest beam search a request may ask for: a beam costs a sequence's KV and compute, and each
    # step ranks the group's candidates on the host.
    max_beam_width: int = 16
    # Rank beam search's candidates on the device, one forward pass per token for all beams, the host a
    # step behind (engine/core/beam_device.py); off: every group waits for the host's ranking before
    # its next step. Groups with stop strings rank on the host. Under tensor parallelism every rank
    # ranks the same logits the same way; rank 0's candidates come back.
    beam_device_ranking: bool = True
    # Multi-LoRA (engine.lora). Off: a request naming an adapter is refused. max_loras adapters run in
    # one step (the GPU slots), max_cpu_loras stay loaded on the host (None: max_loras), ranks above
    # max_lora_rank are refused at load.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # "fcfs": arrival order (priority first); "fair": waiting requests ordered by the service their
    # adapter (tenant) has received so far, a virtual token counter (Sheng et al., OSDI 2024).
    scheduling_policy: str = "fcfs"
    # Under "fair": what a computed prompt token and an output token add to their tenant's counter
    # (VTC's w_p and w_q; an adapter's LoRARequest.fair_share divides both).
    fair_prompt_token_weight: float = 1.0
    fair_output_token_weight: float = 2.0
    # Under "fair": the base model's share (requests without an adapter), as an adapter's fair_share.
    fair_base_share: float = 1.0
    # Tensor parallelism (engine.executor.multiproc_executor): the model sharded over this many
    # ranks, one worker process per rank ("mp", one node) or one Ray actor per GPU ("ray", a cluster).
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"
    # The "mp" backend's per-step broadcast (engine/executor/shm_broadcast.py): a shared-memory ring of
    # this many slots of this many bytes. A step's message larger than a slot goes down every rank's
    # pipe instead (logged once); the writer waits for a rank that lags by all the slots.
    tp_broadcast_slots: int = 16
    tp_broadcast_slot_bytes: int = 256 * 1024
    # Who runs the engine, for defaults that differ between them (not a user option): "server" (`weir
    # serve`: streams whose inter-token latency counts) or "offline" (LLM, the step engine: throughput).
    usage: str = field(default="offline", metadata={"option": False})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a model directory")
        _choice("dtype", self.dtype, VALID_DTYPES)
        _choice("device", self.device, VALID_DEVICES)
        _choice("usage", self.usage, ("offline", "server"))
        _choice("load_format", self.load_format, VALID_LOAD_FORMATS)
        _choice("block_size", self.block_size, VALID_BLOCK_SIZES)
        _choice("kv_cache_dtype", self.kv_cache_dtype, tuple(KV_CACHE_DTYPES))
        if self.quantization is not None:
            _choice("quantization", self.quantization, VALID_QUANTIZATIONS)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        if not self.cpu_kv_cache_gb > 0 or not math.isfinite(self.cpu_kv_cache_gb):  # NaN passed "<= 0"
            raise ValueError(f"cpu_kv_cache_gb must be a finite number > 0; got {self.cpu_kv_cache_gb}")
        if self.max_num_seqs is not None:
            _positive("max_num_seqs", self.max_num_seqs)
        if self.max_num_batched_tokens is not None:
            _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_cuda_graph_batch_size is not None:
            _positive("max_cuda_graph_batch_size", self.max_cuda_graph_batch_size)
        mixed = self.max_cuda_graph_mixed_tokens
        if mixed is not None and (not isinstance(mixed, int) or isinstance(mixed, bool) or mixed < 0):
            raise ValueError(
                f"max_cuda_graph_mixed_tokens must be 0 (off) or a positive integer; got {mixed!r}"
            )
        reserve = self.admission_reserve_tokens
        if not isinstance(reserve, int) or isinstance(reserve, bool) or reserve < 0:
            raise ValueError(
                f"admission_reserve_tokens must be 0 (off) or a positive integer; got {reserve!r}"
            )
        threshold = self.long_prefill_token_threshold
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise ValueError(
                f"long_prefill_token_threshold must be 0 (off) or a positive integer; got {threshold!r}"
            )
        _positive("max_waiting_requests", self.max_waiting_requests)
        _positive("max_waiting_tokens", self.max_waiting_tokens)
        _positive("max_best_of", self.max_best_of)
        _positive("max_beam_width", self.max_beam_width)
        _positive("max_loras", self.max_loras)
        _positive("max_lora_rank", self.max_lora_rank)
        if self.max_cpu_loras is not None:
            _positive("max_cpu_loras", self.max_cpu_loras)
            if self.max_cpu_loras < self.max_loras:
                raise ValueError(
                    f"max_cpu_loras must be >= max_loras ({self.max_loras}); got {self.max_cpu_loras}"
                )
        _choice("scheduling_policy", self.scheduling_policy, VALID_SCHEDULING_POLICIES)
        for name in ("fair_prompt_token_weight", "fair_output_token_weight", "fair_base_share"):
            if not valid_fair_weight(getattr(self, name)):
                raise ValueError(f"{name} must be a number in (0, 1e6]; got {getattr(self, name)!r}")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _choice("distributed_executor_backend", self.distributed_executor_backend, VALID_EXECUTOR_BACKENDS)
        _bounded("tp_broadcast_slots", self.tp_broadcast_slots, MAX_TP_BROADCAST_SLOTS)
        _bounded("tp_broadcast_slot_bytes", self.tp_broadcast_slot_bytes, MAX_TP_BROADCAST_SLOT_BYTES)

    def resolve(self) -> ResolvedConfig:
        """Every option resolved against the checkpoint and the device, once: the frozen config the
        engine, the runner and the scheduler read. Raises ValueError naming the option at fault.

        The one value left open is the KV cache's size (`cache.num_kv_blocks`), known only after the
        runner has profiled memory: `ResolvedConfig.with_num_kv_blocks` fills it in, once.
        """
        device = resolve_device(self.device)
        if device == "cuda":
            import torch  # noqa: PLC0415

            if not torch.cuda.is_available():
                raise ValueError("device is 'cuda' but torch sees no CUDA device; use device='cpu' or 'auto'")
        model = ModelConfig.from_pretrained(
            self.model, max_model_len=self.max_model_len, dtype=self.dtype, device=device
        )
        return self.resolve_with(model)

    def resolve_with(self, model: ModelConfig) -> ResolvedConfig:
        """`resolve()` against a checkpoint config already read (its device and dtype resolved)."""
        device = model.device
        on_cuda = device == "cuda"
        max_model_len = model.max_model_len
        # On a GPU the batch may be much larger than on a CPU: many sequences per step keep the
        # weights' memory traffic amortised (offline throughput with 1000 requests is bound by how
        # many run at once), and the KV cache, not this number, is what limits them in practice.
        max_num_seqs = self.max_num_seqs or (1024 if on_cuda else 256)
        # Large prefill chunks amortise the per-step host cost (an eager step's kernel launches) on
        # a GPU. The runner profiles memory for a step of this many tokens. A server's steps stay at
        # 2048: S1 at rate inf on an H200 (1,024-token prompts, 8B) ran as fast as with 8192 (3,914
        # vs 3,843 output tok/s) with its ITL p99 at 110 ms instead of 416 (decodes no longer wait
        # behind 8,192-token prefills; loadtest/results/u1-beam-s1inf-h200-2026-12-03-718ceba).
        max_num_batched_tokens = self.max_num_batched_tokens or (
            (2048 if self.usage == "server" else max(8192, max_model_len)) if on_cuda else 512
        )
        mixed = self.max_cuda_graph_mixed_tokens
        # Never more than a step can hold.
        mixed_graph_tokens = min(
            mixed if mixed is not None else (512 if on_cuda else 0), max_num_batched_tokens
        )
        parallel = _resolve_parallel(
            model,
            self.tensor_parallel_size,
            self.distributed_executor_backend,
            self.tp_broadcast_slots,
            self.tp_broadcast_slot_bytes,
        )
        quant = _resolve_quantization(model.model_path, self.quantization)
        refusal = None
        if quant.linear is not None:
            refusal = model.quantized_weights_refusal(quant.method)
            if refusal is None and model.is_moe:
                # The experts are stacked tensors run by the fused MoE op, which reads float, FP8 and
                # integer weights (engine.model.quantization.fp8_moe, wna16_moe): another format's
                # would be misread.
                refusal = quant.linear.moe_refusal()
        if refusal is not None:
            raise ValueError(
                f"quantization {quant.method!r} ({quant.source}) is not supported for {model.architecture}: "
                f"{refusal}"
            )
        return ResolvedConfig(
            model=model,
            quant=quant,
            load=LoadConfig(
                load_format=self.load_format, tokenizer=self.tokenizer or self.model, seed=self.seed
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_dtype=KV_CACHE_DTYPES[self.kv_cache_dtype] or model.dtype,
                enable_prefix_caching=self.enable_prefix_caching,
                gpu_memory_utilization=self.gpu_memory_utilization,
                cpu_kv_cache_gb=self.cpu_kv_cache_gb,
                num_kv_blocks_override=self.num_kv_blocks,
                sliding_window=model.uniform_sliding_window,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                long_prefill_token_threshold=self.long_prefill_token_threshold,
                admission_reserve_tokens=self.admission_reserve_tokens,
                mixed_step_token_cap=(
                    mixed_graph_tokens
                    if self.fit_mixed_steps_to_cuda_graphs and not self.enforce_eager
                    else 0
                ),
                mixed_step_fit_backlog_tokens=MIXED_STEP_FIT_BACKLOG_TOKENS,
                max_model_len=max_model_len,
                async_scheduling=self.async_scheduling,
                max_waiting_requests=self.max_waiting_requests,
                max_waiting_tokens=self.max_waiting_tokens,
                max_best_of=self.max_best_of,
                max_beam_width=self.max_beam_width,
                beam_device_ranking=self.beam_device_ranking,
                scheduling_policy=self.scheduling_policy,
                fair_token_weights=(
                    float(self.fair_prompt_token_weight),
                    float(self.fair_output_token_weight),
                ),
                fair_base_share=float(self.fair_base_share),
            ),
            lora=LoRAConfig(
                max_loras=self.max_loras,
                max_lora_rank=self.max_lora_rank,
                max_cpu_loras=self.max_cpu_loras or self.max_loras,
            )
            if self.enable_lora
            else None,
            parallel=parallel,
            device=DeviceConfig(
                device=device,
                enforce_eager=self.enforce_eager,
                # Large decode batches are the host-bound ones when eager (~0.5 ms of launches per layer).
                max_cuda_graph_batch_size=self.max_cuda_graph_batch_size or 1024,
                max_cuda_graph_mixed_tokens=mixed_graph_tokens,
            ),
        )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _bounded(name: str, value: object, high: int) -> None:
    _positive(name, value)
    if value > high:  # type: ignore[operator]
        raise ValueError(f"{name} must be at most {high}; got {value}")


def _resolve_parallel(
    model: ModelConfig, tp: int, backend: str, slots: int, slot_bytes: int
) -> ParallelConfig:
    """The tensor-parallel size checked against the model's shapes and, on CUDA with the "mp" backend,
    the devices this process sees (a Ray cluster's GPUs are counted when its placement group forms)."""
    ring = {"tp_broadcast_slots": slots, "tp_broadcast_slot_bytes": slot_bytes}
    if tp == 1:
        return ParallelConfig(distributed_executor_backend=backend, **ring)
    if (
        model.qk_norm_across_heads
    ):  # OLMo 2 / 3, OLMoE: each rank holds only its heads, the norm needs them all
        raise ValueError(
            f"tensor_parallel_size {tp} is not supported for {model.architecture}: its q/k RMSNorms "
            "span every attention head; serve it with tensor_parallel_size 1"
        )
    what = {
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.intermediate_size,
    }
    if model.is_moe:  # each expert's (and the shared expert's) intermediate rows are split like the MLP's
        what["moe_intermediate_size"] = model.moe_intermediate_size
        if model.shared_expert_intermediate_size:
            what["shared_expert_intermediate_size"] = model.shared_expert_intermediate_size
    for name, value in what.items():
        if value % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide the model's {name} ({value}); "
                f"choose a tensor_parallel_size that divides it"
            )
    # KV heads are split when there are at least tp of them, else replicated (tp a multiple of them).
    kv = model.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(
            f"tensor_parallel_size {tp} and the model's num_key_value_heads ({kv}) must divide one another"
        )
    if model.device == "cuda" and backend == "mp":
        import torch  # noqa: PLC0415

        count = torch.cuda.device_count()
        if tp > count:
            raise ValueError(
                f"tensor_parallel_size {tp} needs {tp} GPUs (one per rank); this machine has {count}"
            )
    return ParallelConfig(tensor_parallel_size=tp, distributed_executor_backend=backend, **ring)


def _resolve_quantization(model_path: str, requested: str | None) -> QuantConfig:
    from engine.model.quantization.detect import resolve_quantization  # noqa: PLC0415 (imports torch)

    method, source, linear = resolve_quantization(model_path, requested)
    if linear is not None:
        logger.info("quantization: %s, from %s: %s", method, source, linear)
    return QuantConfig(method=method, source=source, linear=linear)


@dataclass(frozen=True, slots=True)
class QuantConfig:
    method: str  # "none" | "gptq" | "awq" | "fp8" | "squeezellm" | "compressed-tensors"
    source: str  # where the checkpoint's quantization config was read ("" when unquantized)
    # The layers' method chooser (engine.model.quantization.QuantizationConfig), frozen; None: unquantized
    linear: Any = None


@dataclass(frozen=True, slots=True)
class LoadConfig:
    load_format: str  # "auto" | "safetensors" | "dummy" (random weights, for benchmarks)
    tokenizer: str  # the tokenizer's directory (the model's unless given)
    seed: int  # the torch seed: dummy weights and unseeded sampling


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int  # tokens per KV block
    kv_cache_dtype: str  # torch dtype name of the K/V caches: the model's, float8_e4m3fn or float8_e5m2
    enable_prefix_caching: bool
    gpu_memory_utilization: float  # share of the GPU's memory the engine may use, KV cache included
    cpu_kv_cache_gb: float  # KV cache size on CPU
    num_kv_blocks_override: int | None  # the user's num_kv_blocks: skips the memory profile
    # The window of every attention layer (ModelConfig.uniform_sliding_window): a sequence then holds
    # only the blocks its window reaches (engine/core/sliding_window.py). None: whole contexts.
    sliding_window: int | None = None
    # Set once, after the runner sized the cache (ResolvedConfig.with_num_kv_blocks); None before.
    num_kv_blocks: int | None = None


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int  # sequences per step (also the sampler's row chunk for prompt logprobs)
    max_num_batched_tokens: int  # tokens per step; the runner's memory profile is for this many
    # The longest a request (prompt + output) may be: the model's max_model_len, capped to the KV
    # cache's capacity once it is known (a request longer than the whole cache could never run).
    max_model_len: int
    async_scheduling: bool  # launch step N+1 before step N's sampled ids reach the host
    max_waiting_requests: int  # admission control (serving): beyond these, 429
    max_waiting_tokens: int
    max_best_of: int = 20  # a request with best_of > n above this is refused (input processor)
    max_beam_width: int = 16  # a beam search wider than this is refused (input processor)
    beam_device_ranking: bool = False  # beam groups ranked on the device (EngineConfig's)
    scheduling_policy: str = "fcfs"  # "fcfs" | "fair" (EngineConfig.scheduling_policy)
    fair_token_weights: tuple[float, float] = (1.0, 2.0)  # "fair": (prompt, output) token weights
    fair_base_share: float = 1.0  # "fair": the base model's share (an adapter's is its fair_share)
    long_prefill_token_threshold: int = 0  # one request's tokens per step (0: no cap below the budget)
    # fit_mixed_steps_to_cuda_graphs: when a step already holds tokens (decodes), a prompt's chunk is cut
    # so the step stays within this many tokens, the largest mixed CUDA graph (0: no such cut).
    mixed_step_token_cap: int = 0
    # The cut applies while the prompts' backlog (running and waiting) is at most this many tokens, or
    # one full step if that is more; past it the queue's own wait dominates TTFT and full steps drain it.
    mixed_step_fit_backlog_tokens: int = 0
    # Admission keeps free KV blocks for the running requests' next this-many tokens each (fewer where
    # max_tokens ends sooner) and for the rest of every admitted prompt; 0: a request is admitted
    # whenever its next prompt chunk fits (vLLM's policy), and the running ones grow by preempting.
    admission_reserve_tokens: int = 0

    @property
    def max_chunk_tokens(self) -> int:
        """The most tokens one request computes in a step (what a windowed sequence's blocks grow by)."""
        cap = self.long_prefill_token_threshold
        return min(cap, self.max_num_batched_tokens) if cap > 0 else self.max_num_batched_tokens


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    max_loras: int  # adapters in one step: the GPU slots of stacked A/B weights
    max_lora_rank: int  # the slots' rank; adapters of lower rank are zero-padded
    max_cpu_loras: int  # adapters kept loaded on the host (LRU)


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    # Ranks the model is sharded over (1: the in-process runner, no torch.distributed).
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"  # "mp": worker processes; "ray": Ray actors
    tp_broadcast_slots: int = 16  # the "mp" backend's shared-memory ring: slots ...
    tp_broadcast_slot_bytes: int = 256 * 1024  # ... of this many payload bytes


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    device: str  # resolved: "cpu" | "cuda"
    enforce_eager: bool  # no CUDA graphs
    max_cuda_graph_batch_size: int  # decode batches above run eagerly
    max_cuda_graph_mixed_tokens: int  # mixed steps up to this many tokens replay graphs; 0: none

    @property
    def use_cuda_graphs(self) -> bool:
        return self.device == "cuda" and not self.enforce_eager


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """Everything the engine runs by, resolved once."""

    model: ModelConfig  # the checkpoint: architecture, shapes, dtype, model max_model_len
    quant: QuantConfig  # the weights' quantization, checked against what weir runs
    load: LoadConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: DeviceConfig
    lora: LoRAConfig | None = None  # None: LoRA off (EngineConfig.enable_lora)

    def with_num_kv_blocks(self, num_kv_blocks: int) -> ResolvedConfig:
        """The config once the KV cache is sized: `cache.num_kv_blocks` set, and
        `scheduler.max_model_len` capped to the cache's capacity (serve shorter contexts rather than
        refuse to start), unless every layer's window bounds what a sequence holds to what the cache
        has. The one place either value is decided."""
        if self.cache.num_kv_blocks is not None:
            raise RuntimeError("the KV cache size is already set")
        if num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive; got {num_kv_blocks}")
        capacity = num_kv_blocks * self.cache.block_size
        max_model_len = self.scheduler.max_model_len
        # A windowed sequence holds its window's blocks, not its context's: it may outgrow the cache.
        held = max_blocks_held(
            max_model_len, self.cache.block_size, self.cache.sliding_window, self.scheduler.max_chunk_tokens
        )
        if held > num_kv_blocks:
            logger.warning(
                "the KV cache holds %d tokens (%d blocks of %d), fewer than max_model_len %d; "
                "capping max_model_len to %d",
                capacity,
                num_kv_blocks,
                self.cache.block_size,
                max_model_len,
                capacity,
            )
            max_model_len = capacity
        return replace(
            self,
            cache=replace(self.cache, num_kv_blocks=num_kv_blocks),
            scheduler=replace(self.scheduler, max_model_len=max_model_len),
        )
