"""weir's on/off tuning switches, read from the environment: one parser, one table, checked at start.

Each is "1" (on) or "0" (off); unset or empty means its default. Any other value ("true", "yes", "2")
is refused with a message naming the variable, at engine start (`check_env_flags`, called by the model
runner) rather than silently read as off: a benchmark run with `WEIR_PDL=true` must not measure the
default. Plain Python (no torch, no triton), so ops, engine and app all read it.
"""

from __future__ import annotations

import os

# name -> (default, what it switches; where)
ENV_FLAGS: dict[str, tuple[bool, str]] = {
    "WEIR_PDL": (
        # on an H100 at fee9542 (alternating runs in one call): the batch-1 step bf16 5.598 -> 5.550 ms, GPTQ W4A16
        # 2.712 -> 2.542, FP8 3.500 -> 3.391 (Q1 0.485x -> 0.458x, Q2 0.625x -> 0.611x); 2% slower on an H200 at 5a5b861
        True,
        "programmatic dependent launch through the decode step's kernels; ops/triton/pdl.py",
    ),
    # on an H200 at a047c14: L1 batch 1 4.270 -> 4.208 ms, batch 8 4.601 -> 4.537 (16-bit caches only)
    "WEIR_FUSED_DECODE_ATTENTION": (True, "rotary, KV write and decode attention in one launch"),
    "WEIR_FP8_KV_WIDEN": (
        True,  # on an H200: T1 +11%, Q4's T2 1.023x (was 1.001x), its checks passing (6e851bf's call)
        "an fp8 KV cache read as words widened to float16; ops/triton/fp8_kv_read.py",
    ),
    # decode attention without a split (large batches; ops/triton/paged_attention.py's _unsplit_decode): on an H100 at
    # 08ef700, alternating runs in one call, T1 18,802 / 18,643 -> 19,228 / 19,292 output tok/s with both (+3.0%),
    # 18,998 with two stages alone; T2 3,762.5 -> 3,781 (+0.5%, one run each); on by default since then
    "WEIR_DECODE_TWO_STAGES": (True, "decode attention without a split pipelines 2 KV tiles, not 3"),
    "WEIR_DECODE_WIDE_TILE": (True, "decode attention without a split reads 128 positions a tile, not 64"),
    "WEIR_L2_PREFETCH": (False, "decode GEMVs ask L2 for the next weights; ops/triton/l2_prefetch.py"),
    "WEIR_W4_META_2D": (
        # sm_90 compile at 5e1802c: the one-token loop's three shared-memory layout conversions gone, 128 -> 79
        # registers, bit for bit the same outputs; on an H200 at 9ab6f7f the GPTQ batch-1 step 2.354 -> 2.428 ms
        False,
        "the folded W4A16 GEMV loads scales and zero points in its word tiles' layout; ops/triton/w4_half2_gemv.py",
    ),
    "WEIR_W4_COL_BLOCKED": (
        # an experiment: a second, column-blocked copy of every 4-bit layer's words (twice their memory); on an H100 at
        # 55cf415 the GPTQ batch-1 step 2.684 -> 2.665 ms (-0.7%) for weights of 5.63 -> 9.24 GiB: off
        False,
        "the folded W4A16 decode GEMV reads a column-blocked copy of the words; ops/triton/w4_half2_gemv.py",
    ),
    "WEIR_FP8_GEMV_PIPELINE": (
        # an experiment: the FP8 GEMV waits on memory for most of its samples (H100 at 1396ef1); 3 stages take
        # 64 registers and 6 KB of shared memory a program compiled for sm_90 (triton 3.9); on an H100 at 55cf415 the FP8
        # batch-1 step 3.423 -> 3.469 ms with it: off
        False,
        "the one-token FP8 GEMV's tile loads pipelined by Triton (cp.async, 3 stages); ops/triton/fp8_gemv.py",
    ),
    "WEIR_FLASH_PREFILL": (
        # an experiment: weir's paged prefill attention ran at ~260 TFLOP/s on T2's 8 x 1,024-token steps
        # against flash's ~520 on one 4,096 prompt (H200); on an H100 (torch 2.11) flash lost at T2's shapes: 8 x 1,024
        # prompts 320 us against the paged kernel's 267, a split step 539 against 377 (55cf415)
        False,
        "whole prompts without cached context attended by torch's flash attention; ops/flash_prefill.py",
    ),
    "WEIR_FP8_QUANT_KERNEL": (True, "FP8 activations quantized by the Triton kernel, not torch's lines"),
    "WEIR_FP8_FUSED_QUANT": (True, "a norm or SiLU-mul quantizes the next FP8 linear's input"),
    "WEIR_LORA_SEGMENTS": (True, "multi-LoRA through the segment kernels, not the tile kernels"),
    "WEIR_MOE_ALIGN_KERNEL": (
        # on an H100 at 9c4fe20, one Qwen3-30B-A3B MoE layer at 1 token: 96.1 -> 48.8 us (Mixtral-8x7B 342.5 -> 290.6)
        True,
        "fused_moe's routing sorted by one Triton launch, not ~15 torch ops; ops/triton/moe_align.py",
    ),
    "WEIR_FP8_FAST_ACCUM": (
        # on an H100 at 334c97b, Q3 (T2, FP8 weights vs bf16, one call): 1.375x -> 1.482x; the GEMMs' relative
        # error vs float64 0.03745 -> 0.03756 at K=14336 (loadtest/probe_fp8_gemm.py), FP8's own ~0.037
        True,
        "FP8 W8A8 GEMMs accumulate without periodic float32 promotion (torch._scaled_mm's use_fast_accum)",
    ),
    "WEIR_SKINNY_GEMM": (
        # on H100s at 2330fb4-e50b103, three A/B calls: L1 batch 8 -2.3% to -3.8% (0.870-0.904 -> 0.905-0.926 of
        # the roofline), batch 1 +1.3% to +1.5% though its graph runs no skinny launch (graphs 32-256 too, at
        # 09fb917; T2 unchanged; not yet explained); with PDL on (H100, e507e83's call, d9706b1's kernels) batch 8
        # 6.100 -> 5.877 ms (0.881 -> 0.914), batch 1 5.553 -> 5.547: on since 2026-12-07; alternating runs with PDL on
        # (H100, 9edeecd) batch 8 5.877 -> 5.747 ms, batch 1 5.420 -> 5.418
        True,
        "16-bit linears at 2-16 tokens inside CUDA graphs on a tensor-core Triton GEMM; ops/triton/skinny_gemm.py",
    ),
    "WEIR_W4_SKINNY_GEMM": (
        # on an H100 (loadtest/results/w4-skinny-h100-2026-12-07-593d2fe/): Llama-3-8B's layer at 8 tokens 85.0 us
        # against the W4A16 GEMM's 146.4, at 32 101.4 vs 185.6; at 3-4 tokens it beats the GEMV too (gate_up 39.8
        # vs the gated GEMV's 50.4); L1 on GPTQ at batch 8 / 32: 5.552 -> 3.617 / 6.913 -> 4.364 ms
        True,
        "4-bit linears at 3-255 tokens on the tensor-core W4A16 GEMM; ops/triton/w4_skinny_gemm.py",
    ),
    "WEIR_FP8_SKINNY_GEMM": (
        # on an H100 at 4217c85 (sweep_gemv.py, 8 tokens): qkv 17.0 vs _scaled_mm's 39.6 us, gate_up 50.6 vs 69.4
        True,
        "FP8 linears at 3-16 tokens on the tensor-core skinny GEMM (W8A16), not _scaled_mm; engine/model/quantization/fp8.py",
    ),
    "WEIR_MOE_INT_GEMV": (
        # on an H100 at a38b72f, one W4A16 layer at 1 / 8 tokens: Mixtral-8x7B 485.0 / 1,017 -> 130.7 / 674 us
        True,
        "integer (W4A16 / W8A16) MoE experts at <= 8 tokens on the GEMV decoder, not the grouped GEMM; "
        "ops/triton/moe_wna16_gemv.py",
    ),
    "WEIR_MOE_FP8_GEMV": (
        # on an H100 at 47f3e96, a Qwen3-30B-A3B-shaped model with FP8 experts, batch-1 ITL 4.568 -> 3.243 ms
        True,
        "FP8 MoE experts at <= 8 tokens on the GEMV, not the grouped GEMM; ops/triton/moe_fp8_gemv.py",
    ),
    "WEIR_MOE_ROUTE_KERNEL": (
        # on an H100 at 9ae29e1, Qwen3-30B-A3B-shaped L1: batch 1 5.583 -> 4.813 ms, batch 8 13.147 -> 12.210
        True,
        "an MoE router's softmax and top-k in one Triton launch, not ~6 torch ops; ops/triton/moe_route.py",
    ),
}


def env_flag(name: str) -> bool:
    """The switch `name` (a key of ENV_FLAGS) as the environment sets it, else its default."""
    default = ENV_FLAGS[name][0]
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    if raw not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (unset: {int(default)}); got {raw!r}")
    return raw == "1"


def check_env_flags() -> None:
    """Every switch of ENV_FLAGS the environment sets holds 0 or 1 (ValueError naming the first that does not)."""
    for name in ENV_FLAGS:
        env_flag(name)
