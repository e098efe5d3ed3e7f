"""The Triton interpreter runs kernels the compiler refuses (a plain Python global read inside a kernel,
for one: the per-token FP8 quantizer passed its interpreter tests and failed to compile on an H200).
So the newest kernels (and those that use PDL or split-KV tickets) are also compiled here, without a GPU, for sm_90 (Triton's frontend, its
passes and ptxas from the wheel), in a fresh interpreter without TRITON_INTERPRET, with the 16-byte
divisibility a launch finds in its pointers and strides (the vectorized loads' code, as on the GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (module:kernel, constexprs, pointer argument types; other arguments are i32)
KERNELS = [
    *(
        (
            "ops.triton.fp8_quant:_per_token_fp8_kernel",
            {"INV_FP8_MAX": 1.0 / 448.0, "BLOCK": 4096, "ONE_BLOCK": one_block, "HW_CVT": True},
            {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
        )
        for one_block in (True, False)
    ),
    *(
        (  # the float32 decode (8-bit codes, float32 x): one row prefetched, four rows gated after a K split
            "ops.triton.wna16_gemv:_wna16_gemv_kernel",
            {"BITS": bits, "GROUP_SIZE": 128, "ROWS": rows, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8, "EVEN_N": True,
             "PREFETCH": rows == 1, "PDL": True, "GATED": rows == 4},
            {"x_ptr": "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16", "out_ptr": "*bf16",
             "partials_ptr": "*fp32", "counters_ptr": "*i32"},
        )
        for bits, rows in ((8, 1), (4, 4))
    ),
    *(
        (  # the packed-fp16 W4A16 GEMV's inline PTX (bf16 and fp16 x), loads one and two tiles ahead, gated,
           # the next weights' L2 prefetch (ops/triton/l2_prefetch.py)
            "ops.triton.w4_half2_gemv:_w4_half2_gemv_kernel",
            {"X_BF16": x_bf16, "GROUP_SIZE": 128, "ROWS": rows, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8,
             "EVEN_N": True, "AHEAD": ahead, "X_AHEAD": x_ahead, "LOOP_STAGES": 1, "PDL": True, "EMULATE": False,
             "GATED": gated, "L2_PREFETCH": prefetch},
            {"x_ptr": "*i32", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
             "out_ptr": "*bf16" if x_bf16 else "*fp16", "partials_ptr": "*fp32", "counters_ptr": "*i32",
             "prefetch_ptr": "*u8" if prefetch else "*bf16"},
        )
        for x_bf16, rows, ahead, gated, x_ahead, prefetch in (
            (True, 1, 1, False, False, False), (False, 4, 2, False, False, False), (True, 1, 2, True, False, False),
            (True, 1, 1, True, True, True), (True, 4, 1, False, True, False), (True, 1, 1, False, True, True),
        )
    ),
    *(
        (  # the same with scales and zero points loaded in the word tiles' shape (META_2D)
            "ops.triton.w4_half2_gemv:_w4_half2_gemv_kernel",
            {"X_BF16": True, "GROUP_SIZE": 128, "ROWS": rows, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8,
             "EVEN_N": even_n, "AHEAD": 1, "X_AHEAD": True, "LOOP_STAGES": 1, "PDL": True, "EMULATE": False,
             "GATED": gated, "META_2D": True},
            {"x_ptr": "*i32", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
             "out_ptr": "*bf16", "partials_ptr": "*fp32", "counters_ptr": "*i32", "prefetch_ptr": "*bf16"},
        )
        for rows, gated, even_n in ((1, False, True), (1, True, False), (4, False, True))
    ),
    *(
        (  # the same on a column-blocked copy of the words (COL_BLOCKED, WEIR_W4_COL_BLOCKED's experiment)
            "ops.triton.w4_half2_gemv:_w4_half2_gemv_kernel",
            {"X_BF16": True, "GROUP_SIZE": 128, "ROWS": 1, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4,
             "EVEN_N": True, "AHEAD": 1, "X_AHEAD": True, "LOOP_STAGES": 1, "PDL": False, "EMULATE": False,
             "GATED": gated, "COL_BLOCKED": True},
            {"x_ptr": "*i32", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
             "out_ptr": "*bf16", "partials_ptr": "*fp32", "counters_ptr": "*i32", "prefetch_ptr": "*bf16"},
        )
        for gated in (False, True)
    ),
    *(
        (  # the tensor-core skinny GEMM (2-16 tokens), with and without its split-K tickets
            "ops.triton.skinny_gemm:_skinny_gemm_kernel",
            {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": split_k, "DOT_PRECISION": "tf32",
             "SCALED": fp8},
            {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv" if fp8 else "*bf16", "scale_ptr": "*fp32", "out_ptr": "*bf16",
             "partials_ptr": "*fp32", "counters_ptr": "*i32"},
        )
        for split_k, fp8 in ((1, False), (4, False), (4, True))
    ),
    *(
        (  # the tensor-core W4A16 GEMM (3-255 tokens): its decode's inline PTX for bf16 and fp16 x, the words
           # loaded unmasked and masked, with and without split-K tickets, the scale in the tile (SCALED, as the
           # engine runs it), a 64-row tile
            "ops.triton.w4_skinny_gemm:_w4_skinny_gemm_kernel",
            {"X_FP16": fp16, "GROUP_SIZE": 128, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split_k,
             "EVEN_N": even_n, "SCALED": scaled, "EMULATE": False},
            {"x_ptr": "*fp16" if fp16 else "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
             "out_ptr": "*fp16" if fp16 else "*bf16", "partials_ptr": "*fp32", "counters_ptr": "*i32"},
        )
        for fp16, split_k, even_n, scaled, block_m in (
            (False, 4, True, False, 16), (True, 1, False, False, 16), (False, 2, True, True, 16),
            (True, 4, True, True, 64),
        )
    ),
    (
        "ops.triton.fp8_gemv:_fp8_gemv_kernel",
        {"ROWS": 1, "BLOCK_N": 8, "BLOCK_K": 512, "SPLIT_K": 1, "STATIC_INPUT": False, "PREFETCH": False,
         "PDL": False, "VEC": 8, "GATED": True},
        {"x_ptr": "*bf16", "w_ptr": "*bf16", "scale_ptr": "*fp32", "input_scale_ptr": "*fp32", "out_ptr": "*bf16",
         "partials_ptr": "*fp32", "counters_ptr": "*i32"},
    ),
    *(
        (  # with the next weights' L2 prefetch (ops/triton/l2_prefetch.py)
            "ops.triton.fp8_gemv:_fp8_gemv_kernel",
            {"ROWS": 1, "BLOCK_N": 8, "BLOCK_K": 1024, "SPLIT_K": 1, "STATIC_INPUT": False, "PREFETCH": True,
             "PDL": True, "VEC": 8, "L2_PREFETCH": True},
            {"x_ptr": "*bf16", "w_ptr": weight, "scale_ptr": "*fp32", "input_scale_ptr": "*fp32", "out_ptr": "*bf16",
             "partials_ptr": "*fp32", "counters_ptr": "*i32", "prefetch_ptr": "*u8"},
        )
        for weight in ("*bf16", "*fp8e4nv")
    ),
    *(
        (  # the one-token launch under PDL (the default on sm_90), gated and not
            "ops.triton.fp8_gemv:_fp8_gemv_kernel",
            {"ROWS": 1, "BLOCK_N": 4, "BLOCK_K": 512, "SPLIT_K": 1, "STATIC_INPUT": False, "PREFETCH": False,
             "PDL": True, "VEC": 8, "GATED": gated},
            {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "input_scale_ptr": "*fp32",
             "out_ptr": "*bf16", "partials_ptr": "*fp32", "counters_ptr": "*i32", "prefetch_ptr": "*bf16"},
        )
        for gated in (False, True)
    ),
    *(
        (  # the tile loads pipelined by Triton (LOOP_STAGES, WEIR_FP8_GEMV_PIPELINE's experiment), gated and not
            "ops.triton.fp8_gemv:_fp8_gemv_kernel",
            {"ROWS": 1, "BLOCK_N": 4, "BLOCK_K": 512, "SPLIT_K": 1, "STATIC_INPUT": False, "PREFETCH": False,
             "PDL": False, "VEC": 8, "GATED": gated, "LOOP_STAGES": 3},
            {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "input_scale_ptr": "*fp32",
             "out_ptr": "*bf16", "partials_ptr": "*fp32", "counters_ptr": "*i32", "prefetch_ptr": "*bf16"},
        )
        for gated in (False, True)
    ),
    (
        "ops.triton.seeded_noise:_seeded_noise_kernel",
        {"BLOCK": 4096, "HASH": False},
        {"out_ptr": "*fp32", "rows_ptr": "*i64", "keys_ptr": "*i64"},
    ),
    (
        "ops.triton.sample_argmax:_sample_argmax_kernel",
        {"HAS_NOISE": True, "MAX_PARTS": 64, "BLOCK": 1024},
        {"logits_ptr": "*fp32", "noise_ptr": "*fp32", "part_value_ptr": "*fp32", "part_index_ptr": "*i32",
         "counters_ptr": "*i32", "out_ptr": "*i64"},
    ),
    *(
        (
            "ops.triton.paged_attention:_paged_attention_kernel",
            {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "TILE": 64, "BLOCK_M": 16, "BLOCK_Q": 4, "SPLIT": split,
             "DOT_PRECISION": "tf32", "KV_SCALED": fp8, "PDL": True, "ROTARY": rotary, "FP8_MANT": 3 if fp8 else 0,
             "FP8_MIN_EXP": -6 if fp8 else 0, "FP8_MAX": 448.0 if fp8 else 0.0, "KV_WIDEN": widen,
             "HW_CVT": widen == 1 or split, "WINDOWED": windowed, "SOFTCAP": windowed},
            {"out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
             "counters_ptr": "*i32", "q_ptr": "*bf16", "k_cache_ptr": cache if fp8 else "*bf16",
             "v_cache_ptr": cache if fp8 else "*bf16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
             "query_start_loc_ptr": "*i32", "qk_scale": "fp32", "softcap_log2": "fp32", "k_scale_ptr": "*fp32",
             "v_scale_ptr": "*fp32",
             "positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "k_new_ptr": "*bf16", "v_new_ptr": "*bf16",
             "slot_mapping_ptr": "*i64"},
        )
        # decode_attention (ROTARY: the new token's K/V stored before the tiles are read) split and not
        # widen: the fp8 cache read as words (ops/triton/fp8_kv_read.py), e4m3 1, e5m2 2 (the PTX conversion
        # where HW_CVT; e5m2 unsplit: its bit-arithmetic one, as on a GPU older than sm_89); a sliding window
        # with a softcap (Gemma 2) split with the fused decode's store, and over a widened fp8 cache
        for split, rotary, fp8, widen, cache, windowed in (
            (True, False, False, 0, None, False), (False, False, False, 0, None, False),
            (True, True, False, 0, None, False), (False, True, True, 0, "*fp8e4nv", False),
            (False, False, True, 1, "*fp8e4nv", False), (True, True, True, 1, "*fp8e4nv", False),
            (True, False, True, 2, "*fp8e5", False), (False, False, True, 2, "*fp8e5", False),
            (True, True, False, 0, None, True), (False, False, True, 1, "*fp8e4nv", True),
        )
    ),
    (  # Phi-4-mini's partial rotary: 96 of 128 dims rotate (ROT_HALF 48, not a power of two)
        "ops.triton.paged_attention:_paged_attention_kernel",
        {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "TILE": 64, "BLOCK_M": 16, "BLOCK_Q": 4, "SPLIT": True,
         "DOT_PRECISION": "tf32", "KV_SCALED": False, "PDL": True, "ROTARY": True, "FP8_MANT": 0,
         "FP8_MIN_EXP": 0, "FP8_MAX": 0.0, "KV_WIDEN": 0, "HW_CVT": True, "ROT_HALF": 48},
        {"out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
         "counters_ptr": "*i32", "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
         "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "qk_scale": "fp32",
         "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "positions_ptr": "*i64", "cos_sin_ptr": "*fp32",
         "k_new_ptr": "*bf16", "v_new_ptr": "*bf16", "slot_mapping_ptr": "*i64"},
    ),
    *(
        (  # Phi-3-mini's head_dim 96, padded to 128 lanes (ops/triton/head_dim.py): split with the fused decode's
           # rotary and store over a widened e4m3 cache, a window and a softcap; a bf16 prefill launch (the
           # plain loads, masked and not); a split with partial rotary storing to a bytes-read e5m2 cache
            "ops.triton.paged_attention:_paged_attention_kernel",
            {"GROUP": 4, "HEAD_DIM": 96, "BLOCK_SIZE": 16, "TILE": 64, "BLOCK_M": block_m, "BLOCK_Q": block_m // 4,
             "SPLIT": split, "DOT_PRECISION": "tf32", "KV_SCALED": cache != "*bf16", "PDL": True, "ROTARY": rotary,
             "FP8_MANT": {"*fp8e4nv": 3, "*fp8e5": 2}.get(cache, 0), "FP8_MIN_EXP": {"*fp8e4nv": -6, "*fp8e5": -14}.get(cache, 0),
             "FP8_MAX": {"*fp8e4nv": 448.0, "*fp8e5": 57344.0}.get(cache, 0.0), "KV_WIDEN": widen, "HW_CVT": True,
             "ROT_HALF": rot_half, "WINDOWED": windowed, "SOFTCAP": windowed},
            {"out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
             "counters_ptr": "*i32", "q_ptr": "*bf16", "k_cache_ptr": cache, "v_cache_ptr": cache,
             "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "qk_scale": "fp32",
             "softcap_log2": "fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "positions_ptr": "*i64",
             "cos_sin_ptr": "*fp32", "k_new_ptr": "*bf16", "v_new_ptr": "*bf16", "slot_mapping_ptr": "*i64"},
        )
        for block_m, split, rotary, cache, widen, rot_half, windowed in (
            (16, True, True, "*fp8e4nv", 1, 0, True), (64, False, False, "*bf16", 0, 0, False),
            (16, True, True, "*fp8e5", 0, 24, False),
        )
    ),
    *(
        (  # head_dim 96 (halves of 48 in 64 lanes): the fused rotary + KV write over an fp8 cache, rotary, the KV write
            name,
            {"HALF": 48, "HEAD_DIM": 96, "BLOCK_H": 8, "FP8_MANT": 3, "FP8_MIN_EXP": -6, "FP8_MAX": 448.0, "SCALED": True,
             "PDL": True, "ROT_HALF": 0},
            {"q_out_ptr": "*bf16", "k_out_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
             "positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
             "slot_mapping_ptr": "*i64", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "key_ptr": "*bf16",
             "value_ptr": "*bf16"},
        )
        for name in ("ops.triton.rotary_kv:_rotary_write_kv_kernel", "ops.triton.rotary:_rotary_kernel",
                     "ops.triton.kv_cache:_write_kv_cache_kernel")
    ),
    *(
        (
            "ops.triton.rotary_kv:_rotary_write_kv_kernel",
            {"HALF": 64, "BLOCK_H": 8, "FP8_MANT": 3 if rot_half else 0, "FP8_MIN_EXP": -6 if rot_half else 0,
             "FP8_MAX": 448.0 if rot_half else 0.0, "SCALED": bool(rot_half), "PDL": True, "ROT_HALF": rot_half},
            {"q_out_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "positions_ptr": "*i64",
             "cos_sin_ptr": "*bf16", "k_cache_ptr": "*fp8e4nv" if rot_half else "*bf16",
             "v_cache_ptr": "*fp8e4nv" if rot_half else "*bf16", "slot_mapping_ptr": "*i64",
             "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"},
        )
        for rot_half in (0, 48)  # 48: Phi-4-mini's partial rotary, over an fp8 cache
    ),
    (
        "ops.triton.rotary:_rotary_kernel",
        {"HALF": 64, "BLOCK_H": 8, "ROT_HALF": 48},
        {"q_out_ptr": "*bf16", "k_out_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*bf16", "positions_ptr": "*i64",
         "cos_sin_ptr": "*fp32"},
    ),
    *(
        (
            "ops.triton.rms_norm:_rms_norm_kernel",
            {"HAS_RESIDUAL": True, "BLOCK": 4096, "PDL": True, "QUANT": quant, "INV_FP8_MAX": 1.0 / 448.0,
             "HW_CVT": True, "GEMMA": gemma},
            {"out_ptr": "*fp8e4nv" if quant else "*bf16", "scale_ptr": "*fp32", "new_residual_ptr": "*bf16",
             "x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "eps": "fp32"},
        )
        for quant, gemma in ((False, False), (True, False), (False, True))
    ),
    *(
        (
            "ops.triton.activation:_silu_and_mul_kernel",
            {"BLOCK": 16384 if quant else 2048, "PDL": True, "QUANT": quant, "INV_FP8_MAX": 1.0 / 448.0,
             "HW_CVT": True, "GELU_TANH": gelu},
            {"out_ptr": "*fp8e4nv" if quant else "*bf16", "scale_ptr": "*fp32", "x_ptr": "*bf16"},
        )
        for quant, gelu in ((False, False), (True, False), (False, True))
    ),
    *(
        (  # the fused MoE's grouped GEMMs: [gate; up] with silu-mul in the epilogue, down with the routing weight
            "ops.triton.fused_moe:_moe_gemm_kernel",
            {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GATED": gated, "IEEE": False},
            {"a_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "weights_ptr": "*fp32",
             "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32"},
        )
        for gated in (True, False)
    ),
    (  # a float expert's decode tile (fused_moe.DECODE_TILE): 128-deep K tiles
        "ops.triton.fused_moe:_moe_gemm_kernel",
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GATED": True, "IEEE": False},
        {"a_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "weights_ptr": "*fp32",
         "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32"},
    ),
    *(
        (  # FP8 experts (W8A16): the fp8 tiles dequantized in registers, per block or per channel; static
           # input scales through the hardware fp8 conversion
            "ops.triton.fused_moe:_moe_gemm_kernel",
            {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GATED": gated, "IEEE": False, "W_FP8": True,
             "BLOCKED": blocked, "A_QDQ": static, "HW_CVT": True},
            {"a_ptr": "*bf16", "w_ptr": "*fp8e4nv", "out_ptr": "*bf16", "weights_ptr": "*fp32",
             "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32",
             "scale_ptr": "*fp32", "a_scale_ptr": "*fp32"},
        )
        for gated, blocked, static in ((True, True, False), (False, False, True))
    ),
    *(
        (  # integer experts (W4A16, W8A16): codes shifted out of int32 words along K, group zeros and scales
            "ops.triton.fused_moe:_moe_gemm_kernel",
            {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GATED": gated, "IEEE": False, "W_BITS": bits},
            {"a_ptr": "*bf16", "w_ptr": "*i32", "out_ptr": "*bf16", "weights_ptr": "*fp32",
             "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32",
             "scale_ptr": "*fp32", "a_scale_ptr": "*fp32", "zeros_ptr": "*fp32"},
        )
        for gated, bits in ((True, 4), (False, 8))
    ),
    (  # integer experts' decode tile (fused_moe.DECODE_TILE): 128-deep K tiles in one group each
        "ops.triton.fused_moe:_moe_gemm_kernel",
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GATED": True, "IEEE": False, "W_BITS": 4, "ONE_GROUP": True},
        {"a_ptr": "*bf16", "w_ptr": "*i32", "out_ptr": "*bf16", "weights_ptr": "*fp32",
         "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32",
         "scale_ptr": "*fp32", "a_scale_ptr": "*fp32", "zeros_ptr": "*fp32"},
    ),
    (  # GPTQ act order: GEMM 1 gathers x's columns through the expert's permutation
        "ops.triton.fused_moe:_moe_gemm_kernel",
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GATED": True, "IEEE": False, "W_BITS": 4, "A_PERM": True},
        {"a_ptr": "*bf16", "w_ptr": "*i32", "out_ptr": "*bf16", "weights_ptr": "*fp32",
         "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32",
         "scale_ptr": "*fp32", "a_scale_ptr": "*fp32", "zeros_ptr": "*fp32", "perm_ptr": "*i32"},
    ),
    *(
        (  # integer experts at decode batches (ops/triton/moe_wna16_gemv.py): [gate; up] with silu-mul and act
           # order's gather, K split; down with the routing weight, 8-bit codes, K whole
            "ops.triton.moe_wna16_gemv:_moe_wna16_gemv_kernel",
            {"TOP_K": 8 if gated else 1, "BITS": bits, "GROUP_SIZE": 128, "BLOCK_N": 64, "BLOCK_K": 128,
             "SPLIT_K": 4 if gated else 1, "EVEN_N": True, "GATED": gated, "ROUTED": not gated, "A_PERM": gated},
            {"a_ptr": "*bf16", "w_ptr": "*i32", "scales_ptr": "*fp32", "zeros_ptr": "*fp32", "out_ptr": "*bf16",
             "partials_ptr": "*fp32", "counters_ptr": "*i32", "topk_ids_ptr": "*i64", "weights_ptr": "*fp32",
             "perm_ptr": "*i32"},
        )
        for gated, bits in ((True, 4), (False, 8))
    ),
    *(
        (  # FP8 experts at decode batches (ops/triton/moe_fp8_gemv.py): [gate; up] with block scales, a static
           # input scale through the hardware conversion and silu-mul; down per channel with the routing weight
            "ops.triton.moe_fp8_gemv:_moe_fp8_gemv_kernel",
            {"TOP_K": 8 if gated else 1, "BLOCK_N": 4, "BLOCK_K": 512, "SPLIT_K": 1 if gated else 2,
             "BLOCKED": gated, "STATIC_INPUT": gated, "GATED": gated, "ROUTED": not gated, "VEC": 8, "HW_CVT": True},
            {"a_ptr": "*bf16", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "input_scale_ptr": "*fp32",
             "out_ptr": "*bf16", "partials_ptr": "*fp32", "counters_ptr": "*i32", "topk_ids_ptr": "*i64",
             "weights_ptr": "*fp32"},
        )
        for gated in (True, False)
    ),
]  # fmt: skip

# compile_sm90(fn, consts, types): the kernel compiled for sm_90 as a launch would specialize it; the scripts below
# (each run in a fresh interpreter without TRITON_INTERPRET) start with it
_SM90 = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
def compile_sm90(fn, consts, types):
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}  # (a dict may serve several kernels)
    # constexprs left out take their defaults, as a launch does (else they would compile as runtime values)
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    constexprs = {(i,): consts[n] for i, n in enumerate(fn.arg_names) if n in consts}
    # as launches specialize them: pointers (torch's allocations) and strides divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if p.name not in consts and not p.do_not_specialize
             and (signature[p.name].startswith("*") or p.name.startswith("stride"))}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32))
"""

_COMPILE = (
    _SM90
    + """
name, consts, types = json.loads(sys.argv[1])
module, fn_name = name.split(":")
compile_sm90(getattr(importlib.import_module(module), fn_name), consts, types)
"""
)


@pytest.mark.parametrize(
    ("name", "consts", "types"),
    KERNELS,
    ids=[
        k[0].split(":")[1]
        + (f"-head{k[1]['HEAD_DIM']}" if k[1].get("HEAD_DIM", 128) not in (128,) else "")
        + ("" if k[1].get("ONE_BLOCK", True) else "-two_pass")
        + ("-split" if k[1].get("SPLIT") else "")
        + ("-rotary" if k[1].get("ROTARY") else "")
        + (f"-rot_half{k[1]['ROT_HALF']}" if k[1].get("ROT_HALF") else "")
        + ("-fp8kv" if k[1].get("KV_SCALED") else "")
        + (f"-widen{k[1]['KV_WIDEN']}{'ptx' if k[1]['HW_CVT'] else 'bits'}" if k[1].get("KV_WIDEN") else "")
        + ("-window-softcap" if k[1].get("WINDOWED") else "")
        + ("-gemma" if k[1].get("GEMMA") else "")
        + ("-gelu_tanh" if k[1].get("GELU_TANH") else "")
        + ("-fp8" if k[1].get("QUANT") or k[2].get("w_ptr") == "*fp8e4nv" else "")
        + ("-gated" if k[1].get("GATED") else "")
        + ("-blocked" if k[1].get("BLOCKED") else "")
        + ("-static" if k[1].get("A_QDQ") else "")
        + (f"-int{k[1]['W_BITS']}" if k[1].get("W_BITS") else "")
        + ("-act_order" if k[1].get("A_PERM") else "")
        + ("-l2prefetch" if k[1].get("L2_PREFETCH") else "")
        + (f"-rows{k[1]['ROWS']}" if k[1].get("ROWS", 1) > 1 else "")
        + ("-meta2d" if k[1].get("META_2D") else "")
        + ("-col_blocked" if k[1].get("COL_BLOCKED") else "")
        + (f"-stages{k[1]['LOOP_STAGES']}" if k[1].get("LOOP_STAGES", 1) > 1 else "")
        + ("-ragged" if k[1].get("EVEN_N") is False else "")
        for k in KERNELS
    ],
)
def test_kernel_compiles_for_sm90(name: str, consts: dict, types: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps([name, consts, types])],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


_SHARED_MEMORY = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
fused_moe = importlib.import_module("ops.triton.fused_moe")
fn = fused_moe._moe_gemm_kernel
types = {"a_ptr": "*bf16", "w_ptr": "*i32", "out_ptr": "*bf16", "weights_ptr": "*fp32",
         "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32",
         "scale_ptr": "*fp32", "a_scale_ptr": "*fp32", "zeros_ptr": "*fp32"}
n, k = 1536, 2048  # Qwen3-30B-A3B's GEMM 1: [gate; up] of 2 x 768 over a hidden size of 2048
shared = {}
for group_k in json.loads(sys.argv[1]):
    for tokens in (1, 64):
        block_n, block_k, stages = fused_moe.default_tile(n, k, tokens, True, group_k)
        consts = {"BLOCK_M": fused_moe.default_block_m(tokens), "BLOCK_N": block_n, "BLOCK_K": block_k,
                  "GATED": True, "IEEE": False, "W_BITS": 4, "ONE_GROUP": group_k % block_k == 0}
        consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
        signature = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
        constexprs = {(i,): consts[a] for i, a in enumerate(fn.arg_names) if a in consts}
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
                 if p.name not in consts and (signature[p.name].startswith("*") or p.name.startswith("stride"))}
        options = {} if stages is None else {"num_stages": stages}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
        shared[f"group {group_k}, {tokens} tok, tile {block_n}x{block_k}"] = compiled.metadata.shared
print(json.dumps(shared))
"""


def test_integer_moe_default_tiles_fit_h100_shared_memory() -> None:
    """The integer experts' default launches (fused_moe.default_tile) at every GPTQ group size, decode and
    prefill, ask for no more shared memory than an sm_90 block may have (227 KB). A 128-deep decode tile
    across groups of 32 asked an H100 for 303 KB and failed to launch (a16eb5b's feature check); compiled
    here the same launch asks 299 KB, so this catches it without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _SHARED_MEMORY, json.dumps([32, 64, 128, 2048])],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    too_big = {launch: size for launch, size in shared.items() if size > 227 * 1024}
    assert len(shared) == 8 and not too_big, shared


_LOOP_CONVERSIONS = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ops.triton.w4_half2_gemv import _w4_half2_gemv_kernel as fn
out = {}
for meta_2d in (False, True):
    consts = {"X_BF16": True, "GROUP_SIZE": 128, "ROWS": 1, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4,
              "EVEN_N": True, "AHEAD": 1, "X_AHEAD": True, "LOOP_STAGES": 1, "PDL": False, "EMULATE": False,
              "GATED": False, "META_2D": meta_2d}
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    types = {"x_ptr": "*i32", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
             "out_ptr": "*bf16", "partials_ptr": "*fp32", "counters_ptr": "*i32", "prefetch_ptr": "*bf16"}
    signature = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    constexprs = {(i,): consts[a] for i, a in enumerate(fn.arg_names) if a in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if p.name not in consts and (signature[p.name].startswith("*") or p.name.startswith("stride"))}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 2})
    loops = re.findall(r"scf\.for .*?scf\.yield", compiled.asm["ttgir"], re.S)
    out[str(meta_2d)] = {"loops": len(loops), "conversions": sum(body.count("ttg.convert_layout") for body in loops)}
print(json.dumps(out))
"""


def test_meta_2d_leaves_no_layout_conversion_in_the_one_token_loop() -> None:
    """The folded W4A16 GEMV's one-token launch (split 4, x ahead) compiled for sm_90: with META_2D (scales
    and zero points loaded as [HALF_W, BLOCK_N] tiles) its K loop holds no ttg.convert_layout, each of
    which is a shared-memory round trip and two barriers a tile; with the [BLOCK_N] loads it holds some
    (three at triton 3.9: add_lo, add_hi, scale16). If a Triton release changes either, this says so."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _LOOP_CONVERSIONS], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # (two loops: K, and the split-K epilogue's sum over the partials)
    assert found["True"]["conversions"] == 0 and found["True"]["loops"] >= 1, found
    assert found["False"]["conversions"] > 0, found
