"""How many KV-cache blocks the device holds: the configured count, the CPU budget, or what a CUDA
memory profile leaves of total * gpu_memory_utilization.

The accounting lives here; the forwards it measures (the largest step the scheduler may send, the
largest captured decode batch) are the runner's, passed in as callables, so this module knows nothing
of the model. Start-up only: nothing here runs per step.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

from engine.config import CacheConfig
from engine.core.sampling_params import SamplingParams
from engine.worker.cuda_graphs import static_buffer_bytes
from engine.worker.sampler import SamplingRow

logger = logging.getLogger("weir.engine")

GIB = 1 << 30
_MIB = 1 << 20
# Device memory a captured graph holds besides its share of the pool (instantiated graph, pool-segment
# rounding); an allowance kept out of the KV cache.
# (H100: 35 graphs of Qwen3-0.6B, 28 layers, took 0.10 GiB with their pool, ~3 MiB each.)
_GRAPH_OVERHEAD_BYTES = 4 * _MIB


def kv_block_bytes(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: torch.dtype
) -> int:
    """K and V of one block across every layer."""
    elem = torch.empty((), dtype=kv_cache_dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def choose_num_kv_blocks(
    cfg: CacheConfig,
    device: torch.device,
    block_size: int,
    bytes_per_block: int,
    profile: Callable[[], int],  # the CUDA memory profile -> blocks that fit
) -> int:
    """config.num_kv_blocks if set; on CPU from cpu_kv_cache_gb; on CUDA from `profile`."""
    if cfg.num_kv_blocks_override is not None:
        num_blocks = cfg.num_kv_blocks_override
        source = "num_kv_blocks"
    elif device.type == "cpu":
        num_blocks = int(cfg.cpu_kv_cache_gb * GIB) // bytes_per_block
        source = f"cpu_kv_cache_gb={cfg.cpu_kv_cache_gb}"
    else:
        num_blocks = profile()
        source = f"gpu_memory_utilization={cfg.gpu_memory_utilization}"
    if num_blocks <= 0:
        raise ValueError(
            f"no room for the KV cache ({source} gives {num_blocks} blocks of {bytes_per_block} bytes); "
            "raise gpu_memory_utilization / cpu_kv_cache_gb or use a smaller model"
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%s, %.2f GiB, from %s)",
        num_blocks,
        block_size,
        num_blocks * block_size,
        cfg.kv_cache_dtype,
        num_blocks * bytes_per_block / GIB,
        source,
    )
    # (Fewer tokens than max_model_len: ResolvedConfig.with_num_kv_blocks caps requests to this.)
    return num_blocks


def profile_seq_lens(num_tokens: int, max_model_len: int) -> list[int]:
    """The profile step's sequences: num_tokens tokens in sequences as long as allowed, the worst
    case for attention's working memory."""
    return [min(max_model_len, num_tokens - s) for s in range(0, num_tokens, max_model_len)]


def worst_case_sampling_rows(num_rows: int) -> list[SamplingRow]:
    """Rows with every sampler stage at once: the largest working set a step can need. Every other
    row is seeded, so both noise paths run here too (and the seeded-noise kernel is compiled at
    start-up, not inside the first seeded request's step)."""
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
    seeded = params.copy()
    seeded.seed = 0
    return [
        SamplingRow(params=seeded if i % 2 else params, prompt_token_ids=[0], output_token_ids=[0])
        for i in range(num_rows)
    ]


def profile_kv_cache_bytes(
    device: torch.device,
    gpu_memory_utilization: float,
    num_tokens: int,  # of the largest step, for the log
    allocate_temp_cache: Callable[[], int],  # allocates a cache just big enough; -> its bytes
    peak_step: Callable[[], None],  # the largest step: forward, logits and every sampler stage
    graph_pool: Callable[[], int] | None,  # -> the CUDA-graph pool estimate (None: no graphs)
    free_temp_cache: Callable[[], None],
) -> tuple[float, dict[str, float]]:
    """Measure what a running engine needs besides the KV cache -> (bytes left for the cache, may be
    negative; the profile's figures in GiB).

    Needed: the weights; the activation peak of the largest step, as reserved by the caching
    allocator; the CUDA-graph pool plus a per-graph allowance; and memory outside torch (CUDA context,
    other processes). The profile runs on a temporary cache.
    """
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    weights_reserved = torch.cuda.memory_reserved(device)
    temp_cache_bytes = allocate_temp_cache()
    try:
        torch.cuda.synchronize(device)
        before_forward = torch.cuda.memory_reserved(device)
        peak_step()
        torch.cuda.synchronize(device)
        activation_peak = torch.cuda.max_memory_reserved(device) - before_forward

        graph_bytes = graph_pool() if graph_pool is not None else 0
        free, total = torch.cuda.mem_get_info(device)
        non_torch = max((total - free) - torch.cuda.memory_reserved(device), 0)
    finally:
        free_temp_cache()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    needed = weights_reserved + activation_peak + graph_bytes + non_torch
    budget = total * gpu_memory_utilization
    available = budget - needed
    figures = {
        "total_gib": total / GIB,
        "budget_gib": budget / GIB,
        "weights_gib": weights_reserved / GIB,
        "activation_peak_gib": activation_peak / GIB,
        "cuda_graphs_estimate_gib": graph_bytes / GIB,
        "non_torch_gib": non_torch / GIB,
        "kv_cache_gib": max(available, 0) / GIB,
        "profile_temp_cache_gib": temp_cache_bytes / GIB,
    }
    logger.info(
        "memory profile (%d tokens): weights %.2f GiB, activations %.2f GiB, CUDA graphs ~%.2f GiB, "
        "outside torch %.2f GiB; %.2f of %.2f GiB (x%.2f) left for the KV cache",
        num_tokens,
        weights_reserved / GIB,
        activation_peak / GIB,
        graph_bytes / GIB,
        non_torch / GIB,
        available / GIB,
        total / GIB,
        gpu_memory_utilization,
    )
    return available, figures


def profile_graph_pool_bytes(
    device: torch.device,
    largest_decode_forward: Callable[[], None],  # an eager forward of the largest captured decode batch
    sizes: list[int],  # decode graph batch sizes, ascending
    mixed_sizes: list[int],  # mixed graph token counts, ascending
    block_table_width: int,
    graphs_per_size: int = 1,  # 2 with LoRA on: each size is captured with and without the LoRA term
) -> int:
    """Estimate the graph pool: the activation peak of an eager forward of the largest captured
    decode batch (the graphs share one pool, captured largest first), plus the static input buffer
    and a per-graph allowance (for every graph: a second variant shares the pool's activations but
    keeps its own output and graph object)."""
    bs = sizes[-1]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    largest_decode_forward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    # A mixed graph of T tokens holds no more activations than a decode batch of T rows, and the
    # largest decode batch is captured first; a larger mixed size is the exception to allow for.
    if mixed_sizes and mixed_sizes[-1] > bs:
        peak = peak * mixed_sizes[-1] // bs
    buffer = static_buffer_bytes(bs, block_table_width, mixed_sizes[-1] if mixed_sizes else 0)
    return peak + buffer + _GRAPH_OVERHEAD_BYTES * graphs_per_size * (len(sizes) + len(mixed_sizes))
