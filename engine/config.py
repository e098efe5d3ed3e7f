"""Engine configuration, validated once at the edge. Plain Python, no torch.

`EngineConfig` is what `LLM(...)`, `AsyncEngine` and `weir serve` all build. Fields left as None are
resolved from the model (`max_model_len`) or the device (`num_kv_blocks`) when the engine starts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

VALID_DTYPES = ("auto", "float32", "float16", "bfloat16")
VALID_DEVICES = ("auto", "cpu", "cuda")
VALID_LOAD_FORMATS = ("auto", "safetensors", "dummy")
VALID_BLOCK_SIZES = (8, 16, 32, 64)


@dataclass(slots=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None  # defaults to model
    dtype: str = "auto"  # auto: bfloat16 on cuda (float16 if unsupported), float32 on cpu
    device: str = "auto"  # auto: cuda when available
    seed: int = 0
    load_format: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from gpu_memory_utilization (cuda) or cpu_kv_cache_gb
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 1.0
    max_num_seqs: int | None = None  # None: 1024 on cuda (as vLLM on large GPUs), 256 on cpu
    max_num_batched_tokens: int | None = None  # None: max(8192, max_model_len) on cuda, 512 on cpu
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
    # Admission control (serving): beyond these the server answers 429 instead of queueing.
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1_048_576

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a model directory")
        _choice("dtype", self.dtype, VALID_DTYPES)
        _choice("device", self.device, VALID_DEVICES)
        _choice("load_format", self.load_format, VALID_LOAD_FORMATS)
        _choice("block_size", self.block_size, VALID_BLOCK_SIZES)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gb <= 0:
            raise ValueError(f"cpu_kv_cache_gb must be > 0; got {self.cpu_kv_cache_gb}")
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
        _positive("max_waiting_requests", self.max_waiting_requests)
        _positive("max_waiting_tokens", self.max_waiting_tokens)

    def with_device_defaults(self, device: str) -> EngineConfig:
        """A copy with the fields left None that depend on the device ("cpu" or "cuda") filled in.

        On a GPU the batch may be much larger than on a CPU: many sequences per step keep the weights'
        memory traffic amortised (offline throughput with 1000 requests is bound by how many run at
        once), and the KV cache, not this number, is what limits them in practice.
        """
        on_cuda = device == "cuda"
        return replace(
            self,
            max_num_seqs=self.max_num_seqs or (1024 if on_cuda else 256),
            # Large decode batches are the host-bound ones when eager (~0.5 ms of launches per layer).
            max_cuda_graph_batch_size=self.max_cuda_graph_batch_size or 1024,
            max_cuda_graph_mixed_tokens=(
                self.max_cuda_graph_mixed_tokens
                if self.max_cuda_graph_mixed_tokens is not None
                else (512 if on_cuda else 0)
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
