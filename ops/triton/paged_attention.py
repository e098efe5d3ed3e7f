"""Paged attention Triton kernel for mixed prefill + decode batches. Hot path: kept minimal on purpose.

One launch covers the whole batch. The grid is (query blocks, KV heads[, KV segments]):
- A program owns BLOCK_Q consecutive query tokens of one sequence and all GROUP query heads that share
  one KV head, stacked as BLOCK_M = BLOCK_Q * GROUP rows of one tile, so every K/V tile is read once per
  KV head and feeds a tensor-core dot (M >= 16 even for a lone decode token with GQA).
- Query blocks are numbered per sequence as `query_start_loc[s] // BLOCK_Q + s`, so the grid size
  `num_tokens // BLOCK_Q + num_seqs` is an upper bound known from shapes alone; each program finds its
  sequence by binary search over query_start_loc and leaves at once if it has no rows. No host syncs:
  the launch is CUDA-graph safe.
- K/V are walked in tiles of TILE positions (any multiple or fraction of block_size), looking up each
  position's physical block in the block table; causal masking per row; online softmax in float32 with
  exp2 (the softmax scale folded into log2(e)).
- Split-KV (flash-decoding): with SPLIT a third grid axis splits each sequence's tiles into
  num_segments segments. Chosen for decode-heavy batches too small to fill the GPU with long contexts.
  Only the segments that hold tiles of a query block work (a CUDA graph sizes the split for the longest
  context, so at a short one most leave at once); with one such segment it writes the output itself,
  with more each writes a float32 partial (max, sum, unnormalised acc), takes a ticket from a counter
  per (query block, KV head), and the last one merges them and puts the counter back to zero
  (ops/triton/split_k.py's pattern; its counter workspace is shared). No second kernel: one launch
  less per layer and one compile less per variant, though the batch-1 step on an H200 did not move
  measurably (fd79fcc, A/B in one call: 4.368 against 4.364 ms).
  The segment count is a runtime argument, not a constexpr: each value was a separate compile (~1 s
  each on an H200, five of them met by the CUDA-graph warm-up's decode sizes on a cold Triton cache,
  loadtest/trace_compiles.py), while it only sizes the split and the partials' index.
- FP8 caches: K/V tiles are loaded as 1-byte values and widened to the query's dtype in registers;
  the scales never touch a tile: a program serves one KV head, so it loads that head's k_scale and
  v_scale ([num_kv_heads] float32 device tensors, read in the kernel: CUDA-graph safe) once, folds
  k_scale into the softmax scale and v_scale into the final normalisation. Without scales (a cache in
  the model's dtype; KV_SCALED off) nothing is loaded or multiplied.
- Sliding windows (WINDOWED, `sliding_window` W: a row at position p sees keys p - W + 1 .. p) and logit
  softcapping (SOFTCAP: scores -> c * tanh(scores / c), Gemma 2) are constexpr switches, off for models
  without them (their kernels compile as before). A windowed program starts at the tile holding its
  first row's window start: the tiles before it are never loaded, so a decode reads about W keys
  however long its context, and a split divides those tiles only (the host sizes it from min(context,
  W)). Tiles crossed by some row's window edge take the masked loop, like the causal diagonal, which
  loads no key before the first row's window start either: the blocks before the one holding it may
  have been released by the KV cache manager (a null entry in the table), whatever TILE's ratio to the
  block size.
- Decode batches may also rotate and store this step's K/V in the same launch (ROTARY, `decode_attention`):
  queries are rotated as they are loaded, and the program whose tiles hold the new position stores that
  token's K/V for its KV head before a block barrier and its tile loop. On by default for caches in the
  model's dtype (engine/model/layers/attention.py says why; WEIR_FUSED_DECODE_ATTENTION=0 turns it off).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ops.env_flags import env_flag
from ops.head_dims import check_head_dim
from ops.triton.fp8_kv_read import E4M3, E5M2, load_f16_rows
from ops.triton.head_dim import head_lanes, head_rows_mask, pad
from ops.triton.kv_cache import _FP8_FORMATS, _NOT_FP8, _to_cache
from ops.triton.pdl import let_next_kernel_start, pdl_enabled, wait_for_previous_kernel
from ops.triton.rotary import check_rotary_width
from ops.triton.rotary_kv import check_head_rows_cache, rotated_rows
from ops.triton.split_k import MAX_TILES, split_counters
from ops.triton.tanh import tanh

_LOG2E = 1.4426950408889634
_MAX_SEGMENTS = 32  # _decode_segments' cap (64 measured slower)


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with query_start_loc[s] // BLOCK_Q + s <= q_block."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, pad(HEAD_DIM)], zero past HEAD_DIM
    m_i,  # [BLOCK_M] running max (log2 domain)
    l_i,  # [BLOCK_M] running sum
    acc,  # [BLOCK_M, pad(HEAD_DIM)] float32, unnormalised
    t,  # tile index
    block_table,  # this sequence's row of the block table
    k_head,  # k_cache + kv_head offset
    v_head,
    q_pos,  # [BLOCK_M] last key position each row may see
    kv_end,  # keys at or past this are out of range
    kv_start,  # (WINDOWED) keys before this are in no row's window: never loaded (MASKED tiles)
    qk_scale,
    window,  # (WINDOWED) a row sees keys q_pos - window < k_pos <= q_pos
    softcap_log2,  # (SOFTCAP) softcap * log2(e); qk_scale is then scale / softcap, without log2(e)
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_WIDEN: tl.constexpr,  # 0, or an fp8 cache's format (ops.triton.fp8_kv_read): read as words, widened
    HW_CVT: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, pad(HEAD_DIM))  # lanes past HEAD_DIM (a padded head) load as 0: dots unchanged
    k_pos = t * TILE + offs_t  # [TILE]
    slot = k_pos % BLOCK_SIZE
    if KV_WIDEN:  # float16 tiles of the fp8 cache's exact values (q is float16 then: see the kernel)
        k_valid = k_pos < kv_end
        if WINDOWED:
            # A tile may start before the window's first key: its block may be released (a null entry).
            k_valid = k_valid & (k_pos >= kv_start)
        if MASKED:
            phys = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        else:
            phys = tl.load(block_table + k_pos // BLOCK_SIZE).to(tl.int64)
        k_rows = k_head + phys * stride_kb + slot * stride_ks  # [TILE] row pointers
        v_rows = v_head + phys * stride_vb + slot * stride_vs
        k = load_f16_rows(k_rows, k_valid, HEAD_DIM, KV_WIDEN, HW_CVT, MASKED)  # [TILE, pad(HEAD_DIM)]
        v = load_f16_rows(v_rows, k_valid, HEAD_DIM, KV_WIDEN, HW_CVT, MASKED)
    elif MASKED:
        k_valid = k_pos < kv_end
        if WINDOWED:
            k_valid = k_valid & (k_pos >= kv_start)
        phys = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        k = tl.load(
            k_head + phys[:, None] * stride_kb + slot[:, None] * stride_ks + offs_d[None, :],
            mask=head_rows_mask(k_valid, offs_d, HEAD_DIM),
            other=0.0,
        )  # [TILE, pad(HEAD_DIM)]
        v = tl.load(
            v_head + phys[:, None] * stride_vb + slot[:, None] * stride_vs + offs_d[None, :],
            mask=head_rows_mask(k_valid, offs_d, HEAD_DIM),
            other=0.0,
        )
    else:
        phys = tl.load(block_table + k_pos // BLOCK_SIZE).to(tl.int64)
        if pad(HEAD_DIM) != HEAD_DIM:  # a padded head: only its lanes are masked
            lanes = head_lanes(offs_d, HEAD_DIM)
            k = tl.load(
                k_head + phys[:, None] * stride_kb + slot[:, None] * stride_ks + offs_d[None, :],
                mask=lanes,
                other=0.0,
            )
            v = tl.load(
                v_head + phys[:, None] * stride_vb + slot[:, None] * stride_vs + offs_d[None, :],
                mask=lanes,
                other=0.0,
            )
        else:
            k = tl.load(k_head + phys[:, None] * stride_kb + slot[:, None] * stride_ks + offs_d[None, :])
            v = tl.load(v_head + phys[:, None] * stride_vb + slot[:, None] * stride_vs + offs_d[None, :])
    # (an fp8 cache's tiles widen to q's dtype here; for a cache in q's dtype .to is a no-op)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE]
    if SOFTCAP:  # softcap * tanh(scores / softcap), in the log2 domain
        s = tanh(s) * softcap_log2
    if MASKED:
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        if WINDOWED:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with nothing visible yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# A batch of one must not recompile or make `hi` a constant; neither may a segment count, nor the
# memory profile's one-block-wide block table (stride 1) compile a decode variant of its own.
@triton.jit(do_not_specialize=["num_seqs", "num_segments", "stride_bt", "window"])
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM] (not SPLIT); HEAD_DIM: any size ops/head_dims.py takes
    part_acc_ptr,  # [num_tokens, num_heads, num_segments, HEAD_DIM] float32 (SPLIT)
    part_max_ptr,  # [num_tokens, num_heads, num_segments] float32, log2 domain
    part_sum_ptr,  # [num_tokens, num_heads, num_segments] float32
    counters_ptr,  # [grid 0 x num_kv_heads] int32 zeros (SPLIT), left zero
    q_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    qk_scale,  # softmax scale * log2(e); scale / softcap with SOFTCAP
    window,  # (WINDOWED) the sliding window: keys q_pos - window < k_pos <= q_pos
    softcap_log2,  # (SOFTCAP) the logit softcap * log2(e)
    k_scale_ptr,  # [num_kv_heads] float32 (KV_SCALED): folded into qk_scale
    v_scale_ptr,  # [num_kv_heads] float32 (KV_SCALED): applied to the normalised output
    positions_ptr,  # [num_tokens] int64 (ROTARY)
    cos_sin_ptr,  # [max_position, rotary_dim]: cos | sin (ROTARY)
    k_new_ptr,  # [num_tokens, num_kv_heads * HEAD_DIM]: this step's keys, not rotated yet (ROTARY)
    v_new_ptr,  # [num_tokens, num_kv_heads * HEAD_DIM]: this step's values (ROTARY)
    slot_mapping_ptr,  # [num_tokens] int64; -1: padding, nothing stored (ROTARY)
    num_seqs,
    num_heads,
    num_segments,  # KV segments per sequence (SPLIT; 1 otherwise)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_cs,  # (ROTARY)
    stride_kn,
    stride_vn,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    SPLIT: tl.constexpr,  # num_segments > 1: the split-KV path
    DOT_PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL, and lets the next kernel launch early (ops.triton.pdl)
    ROTARY: tl.constexpr,  # decode batches only: rotate q here, store this step's K/V first (see decode_attention)
    FP8_MANT: tl.constexpr,  # (ROTARY) 0: the cache is in the model's dtype; else its fp8 format's
    FP8_MIN_EXP: tl.constexpr,
    FP8_MAX: tl.constexpr,
    KV_WIDEN: tl.constexpr,  # 0, or the fp8 cache's format: tiles widened to float16 as words, dots in float16
    HW_CVT: tl.constexpr,  # (KV_WIDEN) the GPU's fp8x2 -> f16x2 conversion, else Triton's per byte
    ROT_HALF: tl.constexpr = 0,  # (ROTARY) rotary_dim / 2 when only part of a head rotates; 0: all of it
    WINDOWED: tl.constexpr = False,  # sliding-window attention: tiles wholly before every row's window skipped
    SOFTCAP: tl.constexpr = False,  # attention logit softcapping (Gemma 2)
):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    # a padded head's extra lanes (ops/triton/head_dim.py): zeros in q, K, V and acc, never stored
    offs_d = tl.arange(0, pad(HEAD_DIM))
    q_local = q_block_local * BLOCK_Q + offs_m // GROUP  # [BLOCK_M] query index within the sequence
    head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M]
    row_valid = (q_local < q_len) & (offs_m < BLOCK_Q * GROUP)
    token = (q_start + q_local).to(tl.int64)
    q_rows = q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh  # [BLOCK_M, 1]
    if ROTARY:
        pos = tl.load(positions_ptr + token, mask=row_valid, other=0)  # [BLOCK_M]
        q = rotated_rows(q_rows, cos_sin_ptr + pos[:, None] * stride_cs, row_valid, HEAD_DIM, ROT_HALF)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=head_rows_mask(row_valid, offs_d, HEAD_DIM), other=0.0)
        # q: [BLOCK_M, pad(HEAD_DIM)]
    if KV_WIDEN:
        # The dots run in float16, the widened tiles' type: a 16-bit query loses nothing in [6e-5, 65504]
        # (float16 has three more mantissa bits than bfloat16; beyond that range it is clamped), and the
        # probabilities (<= 1) are rounded to float16 rather than bfloat16.
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    q_pos = context_len + q_local  # [BLOCK_M] the last key position each row may see

    # Keys this program needs: up to its last valid row's position (with a window, from its first row's
    # window start: the tiles before it are never read, so a decode's work stops growing past the window).
    last_q_local = tl.minimum((q_block_local + 1) * BLOCK_Q, q_len) - 1
    kv_end = context_len + last_q_local + 1
    num_tiles = tl.cdiv(kv_end, TILE)
    first_q_pos = context_len + q_block_local * BLOCK_Q
    tile_first = 0
    kv_start = 0
    if WINDOWED:
        # The first key any row reads. The KV cache manager may have released the blocks before the
        # block holding it (engine/core/sliding_window.py): the tile holding it starts up to TILE - 1
        # keys earlier, possibly in such a block, so the masked tiles load no key before it.
        kv_start = tl.maximum(first_q_pos - window + 1, 0)
        tile_first = kv_start // TILE
    if SPLIT:
        if WINDOWED:  # the split covers the window's tiles only
            tiles_per_segment = tl.cdiv(num_tiles - tile_first, num_segments)
            used = tl.cdiv(num_tiles - tile_first, tiles_per_segment)
            tile_lo = tile_first + segment * tiles_per_segment
        else:
            tiles_per_segment = tl.cdiv(tl.cdiv(seq_len, TILE), num_segments)
            # Segments that hold any of this block's tiles: the others leave at once and write nothing (a
            # CUDA graph sizes the split for the longest context; a short one fills the first segment only).
            used = tl.cdiv(num_tiles, tiles_per_segment)
            tile_lo = segment * tiles_per_segment
        tile_hi = tl.minimum(tile_lo + tiles_per_segment, num_tiles)
    else:
        used = 1
        if WINDOWED:
            tile_lo = tile_first
        else:
            tile_lo = 0
        tile_hi = num_tiles
    if segment >= used:
        return
    if ROTARY:
        if segment == used - 1:  # the program whose tiles hold this step's position
            _store_new_kv(
                q_start.to(tl.int64), kv_head, positions_ptr, cos_sin_ptr, k_new_ptr, v_new_ptr, slot_mapping_ptr,
                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, stride_cs, stride_kn, stride_vn, stride_kb,
                stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_SIZE, FP8_MANT, FP8_MIN_EXP, FP8_MAX, KV_SCALED,
                ROT_HALF,
            )  # fmt: skip
            # Every thread's stores before any thread's loads of that position below: a block-wide
            # barrier also orders the block's global memory (the tiles are read by the same block).
            tl.debug_barrier()

    if KV_SCALED:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
    # (SOFTCAP: qk_scale came without log2(e), which softcap_log2 applies after the tanh)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, pad(HEAD_DIM)], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    # Tiles below the first row's position are visible to every row: no masks there. The rest (the
    # causal diagonal of a prefill chunk, a decode's last partial tile) go through the masked loop.
    mid = tl.minimum(tl.maximum((first_q_pos + 1) // TILE, tile_lo), tile_hi)
    if WINDOWED:
        # Tiles that start before the last row's window (some row's window edge crosses them) are masked
        # too; a window narrower than the block's rows leaves no unmasked tile at all.
        full_lo = tl.cdiv(tl.maximum(kv_end - window, 0), TILE)  # first tile inside every row's window
        full_lo = tl.minimum(tl.maximum(full_lo, tile_lo), tile_hi)
        mid = tl.maximum(mid, full_lo)
        for t in range(tile_lo, full_lo):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, t, block_table, k_head, v_head, q_pos, kv_end, kv_start, qk_scale, window,
                softcap_log2, stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_SIZE, TILE, True,
                DOT_PRECISION, KV_WIDEN, HW_CVT, WINDOWED, SOFTCAP,
            )  # fmt: skip
        tile_lo = full_lo
    for t in range(tile_lo, mid):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, t, block_table, k_head, v_head, q_pos, kv_end, kv_start, qk_scale, window,
            softcap_log2, stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_SIZE, TILE, False,
            DOT_PRECISION, KV_WIDEN, HW_CVT, WINDOWED, SOFTCAP,
        )  # fmt: skip
    for t in range(mid, tile_hi):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, t, block_table, k_head, v_head, q_pos, kv_end, kv_start, qk_scale, window,
            softcap_log2, stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_SIZE, TILE, True,
            DOT_PRECISION, KV_WIDEN, HW_CVT, WINDOWED, SOFTCAP,
        )  # fmt: skip

    if KV_SCALED:
        acc = acc * tl.load(v_scale_ptr + kv_head)
    last = segment < used  # whether this program writes the output: true here unless a split's ticket says
    if SPLIT:
        if used > 1:
            part = (token * num_heads + head) * num_segments  # [BLOCK_M]: the rows' segment 0
            tl.store(part_max_ptr + part + segment, m_i, mask=row_valid)
            tl.store(part_sum_ptr + part + segment, l_i, mask=row_valid)
            tl.store(
                part_acc_ptr + (part + segment)[:, None] * HEAD_DIM + offs_d[None, :],
                acc,
                mask=head_rows_mask(row_valid, offs_d, HEAD_DIM),
            )
            # Ticket: every thread's partial is written first; the acq_rel atomic publishes them, and
            # the program drawing the last ticket merges all `used` partials (ops/triton/split_k.py).
            tl.debug_barrier()
            counter = counters_ptr + q_block * tl.num_programs(1) + kv_head
            last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == used - 1
            if last:
                m_i, l_i, acc = _merge_segments(
                    part_max_ptr, part_sum_ptr, part_acc_ptr, part, row_valid, offs_d, used, HEAD_DIM, BLOCK_M
                )
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # clean for the next launch
    if last:  # no split, one used segment, or the split's last program
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=head_rows_mask(row_valid, offs_d, HEAD_DIM),
        )


@triton.jit
def _store_new_kv(
    token, kv_head, positions_ptr, cos_sin_ptr, k_new_ptr, v_new_ptr, slot_mapping_ptr, k_cache_ptr, v_cache_ptr,
    k_scale_ptr, v_scale_ptr, stride_cs, stride_kn, stride_vn, stride_kb, stride_ks, stride_vb, stride_vs,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8_MANT: tl.constexpr, FP8_MIN_EXP: tl.constexpr,
    FP8_MAX: tl.constexpr, SCALED: tl.constexpr, ROT_HALF: tl.constexpr,
):  # fmt: skip
    """Rotate `token`'s key of `kv_head` and store it and its value in the token's cache slot, rounded as
    ops.triton.rotary_kv stores them (the model dtype, then an fp8 cache's format); slot -1 (padding)
    stores nothing. Every load is issued before any depends on another (the slot only addresses the
    stores): one memory round trip before the stores."""
    one = tl.full([1], 0, dtype=tl.int32)  # [1]: rows of one, the helpers' shape
    offs_d = tl.arange(0, pad(HEAD_DIM))
    slot = tl.load(slot_mapping_ptr + token + one)  # [1] int64
    cs_row = cos_sin_ptr + tl.load(positions_ptr + token + one) * stride_cs  # [1]
    k = rotated_rows(
        (k_new_ptr + token * stride_kn + kv_head * HEAD_DIM + one)[:, None],
        cs_row[:, None],
        one == 0,
        HEAD_DIM,
        ROT_HALF,
    )  # fmt: skip  [1, pad(HEAD_DIM)]
    v_ptrs = v_new_ptr + token * stride_vn + kv_head * HEAD_DIM + offs_d[None, :] + one[:, None]
    if pad(HEAD_DIM) != HEAD_DIM:
        v = tl.load(v_ptrs, mask=head_lanes(offs_d, HEAD_DIM), other=0.0)
    else:
        v = tl.load(v_ptrs)
    heads = kv_head + one
    k = _to_cache(k, k_scale_ptr, heads, one == 0, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, 1)
    v = _to_cache(v, v_scale_ptr, heads, one == 0, FP8_MANT, FP8_MIN_EXP, FP8_MAX, SCALED, 1)
    keep = slot >= 0
    safe = tl.where(keep, slot, 0)
    block, in_block = safe // BLOCK_SIZE, safe % BLOCK_SIZE  # [1]
    k_dst = (
        k_cache_ptr
        + (block * stride_kb + in_block * stride_ks + kv_head * HEAD_DIM)[:, None]
        + offs_d[None, :]
    )
    v_dst = (
        v_cache_ptr
        + (block * stride_vb + in_block * stride_vs + kv_head * HEAD_DIM)[:, None]
        + offs_d[None, :]
    )
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=head_rows_mask(keep, offs_d, HEAD_DIM))
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=head_rows_mask(keep, offs_d, HEAD_DIM))


@triton.jit
def _merge_segments(
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    part,
    row_valid,
    offs_d,
    used,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The rows' partials of segments 0 .. used - 1 merged: (max, sum, unnormalised acc) as one pass would
    have left them. Read past L1 (`.cg`): other SMs wrote them."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, pad(HEAD_DIM)], dtype=tl.float32)
    for s in range(used):
        m_s = tl.load(part_max_ptr + part + s, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_sum_ptr + part + s, mask=row_valid, other=0.0, cache_modifier=".cg")
        acc_s = tl.load(
            part_acc_ptr + (part + s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=head_rows_mask(row_valid, offs_d, HEAD_DIM),
            other=0.0,
            cache_modifier=".cg",
        )
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # masked rows stay empty
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    return m_i, l_i, acc


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    """Launch shape. `paged_attention` picks one with `choose_config`; tests and the GPU check pass
    their own to force a path (e.g. split-KV on a small batch)."""

    block_m: int  # rows per program: BLOCK_Q query tokens x GROUP heads (power of two, >= 16)
    tile: int  # KV positions per loop step (power of two, >= 16)
    num_segments: int  # KV splits per sequence; 1 = no split (power of two)
    num_warps: int = 4
    num_stages: int = 2
    fp8_widen: bool | None = None  # an fp8 cache read as words into float16 tiles; None: WEIR_FP8_KV_WIDEN


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device_index: int) -> int:
    """SMs of CUDA device `device_index`; 132 (an H100's) for a CPU tensor (index -1, the interpreter)."""
    return _sm_count(device_index) if device_index >= 0 else 132


def _decode_segments(programs: int, max_seq_len: int, tile: int, sms: int) -> int:
    """Split-KV segments for a decode batch of `programs` (seq, kv head) pairs, contexts up to max_seq_len.

    Fitted on an H100 (loadtest/results/kernels-h100-2026-11-25.json, CUDA-graph timings): aim for about
    4 programs per SM; while the (seq, kv head) programs don't fill the SMs once, split down to one tile
    per segment (b1 ctx4096: 99 -> 15 us), but once they do, the partials and the reduce launch only pay
    off with >= 16 tiles per segment (b32 ctx1024 loses 2% split in two; b64 ctx4096 gains 11%). No
    split under 512 positions, nor past 32 segments (64 measured slower).
    Called per decode launch, so plain int arithmetic (no triton.cdiv calls).
    """
    if max_seq_len < 512:
        return 1
    tiles = (max_seq_len + tile - 1) // tile
    min_tiles = 1 if programs < sms else 16
    segments = min((4 * sms + programs - 1) // programs, tiles // min_tiles, _MAX_SEGMENTS)
    return 1 << (segments.bit_length() - 1) if segments >= 2 else 1


def _unsplit_decode(tile: int, num_stages: int) -> tuple[int, int]:
    """(tile, num_stages) of a decode launch that does not split KV (the large batches of T1's and T2's decode
    steps): 2 stages, not the base launch's 3 (WEIR_DECODE_TWO_STAGES), and 128 positions a tile, not 64
    (WEIR_DECODE_WIDE_TILE), both on by default; a split decode keeps the base launch (its segments were fitted
    to 64-position tiles), and so does a widened fp8 cache (its own tile, `_decode_shape`).

    On an H100 (gpu_kernel_check's shapes part, cc29764, copy 3,017 GB/s) the base t64 s3 read 0.838 / 0.946 /
    0.947 / 0.975 / 0.972 of the copy bandwidth at Qwen3-0.6B b64 ctx1024 / b144 ctx840 / b256 ctx512 / b256
    ctx1024 and Llama-3-8B b256 ctx1152; t64 s2 0.969 / 0.926 / 0.985 / 1.012 / 1.013; t128 s2 0.925 / 0.977 /
    0.981 / 1.010 / 1.013 (the only launch ahead of the base at all five). End to end (08ef700, alternating runs
    in one call): T1 18,802 / 18,643 -> 19,228 / 19,292 output tok/s (+3.0%), T2 3,762.5 -> 3,781 (+0.5%)."""
    if env_flag("WEIR_DECODE_TWO_STAGES"):
        num_stages = 2
    if env_flag("WEIR_DECODE_WIDE_TILE") and tile == 64:
        tile = 128
    return tile, num_stages


def _base_launch(group: int, head_dim: int, decode: bool) -> tuple[int, int, int, int]:
    """(block_m, tile, num_warps, num_stages) before split-KV: the one heuristic both entry points use."""
    tile = 64 if triton.next_power_of_2(head_dim) <= 128 else 32  # a padded head's tiles are its padding's
    if decode:
        return max(16, triton.next_power_of_2(group)), tile, 4, 3
    # Prefill: 2 stages beat 3 at every shape of the H200 sweep (gpu_kernel_check mixed, 83d1569):
    # 8 x 1,024 fresh prompts 268 against 287 us, one 4,096 prompt 419 against 443, mixed 248 against 253.
    return max(64, triton.next_power_of_2(group)), tile, 4, 2


def choose_config(
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_query_len: int,
    max_seq_len: int,
    device: torch.device,
) -> AttentionConfig:
    """Heuristic from python ints only (CUDA-graph safe: the same config for every replay)."""
    group = num_heads // num_kv_heads
    block_m, tile, num_warps, num_stages = _base_launch(group, head_dim, max_query_len == 1)
    segments = 1
    if max_query_len == 1:
        sms = 132  # a CPU tensor (the interpreter): an H100's count, as in _num_sms
        if device.type == "cuda":
            sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        segments = _decode_segments(num_seqs * num_kv_heads, max_seq_len, tile, sms)
        if segments == 1:
            tile, num_stages = _unsplit_decode(tile, num_stages)
    return AttentionConfig(
        block_m=block_m, tile=tile, num_segments=segments, num_warps=num_warps, num_stages=num_stages
    )


class _Plan:
    """Everything `paged_attention` decides from the model's fixed shape, computed (and validated) once per
    (num_heads, num_kv_heads, head_dim, block_size, dtype, device): eager forwards are host-bound, and
    a per-call choose_config + AttentionConfig costs more than the launch arithmetic left below.
    Holds python values only, so it is valid for every batch and across CUDA-graph capture and replay."""

    __slots__ = (
        "decode",
        "decode_unsplit",
        "dot_precision",
        "fp8_widen",
        "group",
        "hw_fp8_cvt",
        "pdl",
        "prefill",
        "sms",
    )

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device_index: int
    ) -> None:
        check_head_dim("paged_attention", head_dim)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.group = group = num_heads // num_kv_heads
        self.dot_precision = "ieee" if dtype == torch.float32 else "tf32"
        self.sms = _num_sms(device_index)
        self.decode = _base_launch(group, head_dim, decode=True)  # (block_m, tile, num_warps, num_stages)
        self.decode_unsplit = _unsplit_decode(
            self.decode[1], self.decode[3]
        )  # (tile, num_stages) without a split
        self.prefill = _base_launch(group, head_dim, decode=False)
        self.pdl = device_index >= 0 and pdl_enabled(torch.device("cuda", device_index))
        self.fp8_widen = fp8_widen_from_env()
        self.hw_fp8_cvt = device_index >= 0 and _hardware_fp8_cvt(device_index)


def fp8_widen_from_env() -> bool:
    """WEIR_FP8_KV_WIDEN=1: 16-bit queries over an fp8 cache read its tiles as words widened to float16
    and run the dots in float16 (ops/triton/fp8_kv_read.py), the default; 0: the bytes widen to the query's
    dtype in the dot's operand layout (Triton's own conversion)."""
    return env_flag("WEIR_FP8_KV_WIDEN")


def _hardware_fp8_cvt(device_index: int) -> bool:
    """cvt.rn.f16x2.{e4m3,e5m2}x2 exists from sm_89; the interpreter runs no PTX."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


_PLANS: dict[tuple[int, int, int, int, torch.dtype, int], _Plan] = {}


def _plan(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, device: int
) -> _Plan:
    plan = _Plan(num_heads, num_kv_heads, head_dim, dtype, device)
    _PLANS[(num_heads, num_kv_heads, head_dim, block_size, dtype, device)] = plan
    return plan


def _plan_for(query: torch.Tensor, k_cache: torch.Tensor) -> _Plan:
    """The plan of a [num_tokens, num_heads, head_dim] query over a [num_blocks, block_size,
    num_kv_heads, head_dim] cache: made on first use, then looked up (every launch asks)."""
    _, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    dtype, device = query.dtype, query.get_device()
    return _PLANS.get((num_heads, num_kv_heads, head_dim, block_size, dtype, device)) or _plan(
        num_heads, num_kv_heads, head_dim, block_size, dtype, device
    )


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32; unused entries arbitrary
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: cumulative query lengths
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32 (fp8 caches); None = 1.0
    v_scale: torch.Tensor | None = None,  # [num_kv_heads] float32 (fp8 caches); None = 1.0
    sliding_window: int | None = None,  # keys q_pos - window < k_pos <= q_pos only; None = all
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap) before the softmax
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context (see the reference)."""
    return _attend(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale,
        k_scale, v_scale, None, sliding_window, softcap,
    )  # fmt: skip


def _attend(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    k_scale: torch.Tensor | None,  # [num_kv_heads] float32
    v_scale: torch.Tensor | None,
    rotary: tuple[torch.Tensor, ...] | None = None,  # see _launch
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """paged_attention's launch shape from its plan (decode or prefill), then the launch."""
    plan = _plan_for(query, k_cache)
    num_seqs = seq_lens.shape[0]
    widen = _kv_widen(query, k_cache, v_cache) if plan.fp8_widen else 0
    if max_query_len == 1:
        # A windowed decode reads at most the window's keys: split for those, not the whole context.
        keys = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
        block_m, tile, segments, num_warps, num_stages = _decode_shape(
            plan, widen != 0, num_seqs * k_cache.shape[2], keys
        )
    else:
        block_m, tile, num_warps, num_stages = plan.prefill
        segments = 1
    return _launch(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale, plan,
        block_m, tile, segments, num_warps, num_stages, widen, rotary=rotary, sliding_window=sliding_window,
        softcap=softcap,
    )  # fmt: skip


def _decode_shape(
    plan: _Plan, widened: bool, programs: int, max_seq_len: int
) -> tuple[int, int, int, int, int]:
    """(block_m, tile, segments, num_warps, num_stages) of a decode launch of `programs` (seq, KV head)
    pairs. Widened fp8 tiles take twice the positions (the bytes of a 16-bit tile) and the split half the
    segments, to keep their tiles: on the H200 (gpu_kernel_check fp8kv, 83d1569) 0.70-0.87x the bf16
    cache's decode time against 0.89-1.03x with 64 positions (b256 ctx2048: 384 and 487 us, bf16 543)."""
    block_m, tile, num_warps, num_stages = plan.decode
    segments = _decode_segments(programs, max_seq_len, tile, plan.sms)
    if widened:
        tile *= 2
        segments = max(1, segments // 2)
    elif segments == 1:
        tile, num_stages = plan.decode_unsplit
    return block_m, tile, segments, num_warps, num_stages


def decode_attention(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_dim], not rotated yet
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim], not rotated yet
    value: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos in the first half, sin in the second
    head_dim: int,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip (padding)
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, including this step's token
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: one token a sequence
    max_seq_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32 (fp8 caches); None = 1.0
    v_scale: torch.Tensor | None = None,
    sliding_window: int | None = None,  # as paged_attention's
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """A decode batch's attention (one new token a sequence) with its rotary embedding and KV write in
    the same launch: ops.reference's rotary_and_write_kv, then paged_attention (the spec).

    Each program rotates its query rows as it loads them; the program whose KV tiles hold the new
    position (the only one, or a split's last segment) first rotates and stores that token's K and V
    for its KV head, then reads them back with the rest of the tile. A prefill chunk cannot do this:
    its tokens' keys are read by other programs, which no barrier inside one launch orders. At batch 1
    this is one launch (~2.8 us on an H200) a layer fewer.

    Tried and reverted (H100, e507e83-6c6b233, loadtest/results/decode-attn-h100-2026-12-07-e507e83/): one program
    row a sequence (no binary search of query_start_loc) with the step's metadata and rotary factors read before
    PDL's wait (only q, this step's K / V and the cache after it): L1 batch 1 -0.4%, batch 8 +0.3%, T2 a tie; the
    grid and the reordered loads alone were 0.4% slower at both batch sizes.
    """
    num_tokens = query.shape[0]
    check_head_rows_cache("decode_attention", k_cache, v_cache, key.shape[1] // head_dim, head_dim)
    check_rotary_width("decode_attention", cos_sin_cache.shape[-1], head_dim)
    if cos_sin_cache.stride(-1) != 1:
        raise ValueError("decode_attention needs cos_sin_cache contiguous in its last dimension")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("decode_attention needs key and value contiguous in their last dimension")
    return _attend(
        query.view(num_tokens, -1, head_dim), k_cache, v_cache, block_tables, seq_lens, query_start_loc, 1,
        max_seq_len, scale, k_scale, v_scale, (positions, key, value, cos_sin_cache, slot_mapping), sliding_window,
        softcap,
    )  # fmt: skip


def paged_attention_with_config(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    config: AttentionConfig | None = None,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32; None = 1.0
    v_scale: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """`paged_attention` with an explicit launch shape (None: the heuristic's, as paged_attention)."""
    if config is None:
        return paged_attention(
            query,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            max_query_len,
            max_seq_len,
            scale,
            k_scale,
            v_scale,
            sliding_window,
            softcap,
        )
    plan = _plan_for(query, k_cache)
    block_m = max(config.block_m, triton.next_power_of_2(plan.group))
    wanted = plan.fp8_widen if config.fp8_widen is None else config.fp8_widen
    widen = _kv_widen(query, k_cache, v_cache) if wanted else 0
    return _launch(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale, plan,
        block_m, config.tile, config.num_segments, config.num_warps, config.num_stages, widen,
        sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip


_WIDEN_FORMATS = {torch.float8_e4m3fn: E4M3.value, torch.float8_e5m2: E5M2.value}
_WIDEN_QUERIES = (torch.bfloat16, torch.float16)


def _kv_widen(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """KV_WIDEN for this launch: the fp8 cache's format where a 16-bit query reads it as 4-byte words
    (the caches' rows aligned to 4 bytes); 0 keeps the bytes path (a float32 query's dots stay float32)."""
    fmt = _WIDEN_FORMATS.get(k_cache.dtype, 0)
    if not fmt or query.dtype not in _WIDEN_QUERIES:
        return 0
    for cache in (k_cache, v_cache):
        if cache.data_ptr() % 4 or any(stride % 4 for stride in cache.stride()[:3]):
            return 0
    return fmt


def _launch(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    k_scale: torch.Tensor | None,  # [num_kv_heads] float32
    v_scale: torch.Tensor | None,
    plan: _Plan,
    block_m: int,
    tile: int,
    segments: int,
    num_warps: int,
    num_stages: int,
    widen: int,  # KV_WIDEN: _kv_widen's format, or 0 (the caller decided it)
    # decode_attention's (positions, key, value, cos_sin, slots): the kernel's ROTARY path
    rotary: tuple[torch.Tensor, ...] | None = None,
    sliding_window: int | None = None,  # the WINDOWED path (None: off)
    softcap: float | None = None,  # the SOFTCAP path (None: off)
) -> torch.Tensor:
    """Allocate the output (and split-KV partials) and launch; every decision is already made."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    qs = query.stride()
    if qs[2] != 1:
        query = query.contiguous()
        qs = query.stride()
    ks, vs = k_cache.stride(), v_cache.stride()
    if ks[3] != 1 or vs[3] != 1:
        raise ValueError("paged_attention needs caches contiguous in head_dim")
    group = plan.group
    block_q = block_m // group
    device = query.device
    # Contiguous, so its strides are (num_heads * head_dim, head_dim) without asking.
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    grid_q = num_tokens // block_q + num_seqs
    if segments > 1 and grid_q * num_kv_heads > MAX_TILES:
        segments = 1  # more (query block, KV head) pairs than split counters: one pass (only forced configs)
    counters = out
    if segments > 1:
        counters = split_counters(device)
        # [num_tokens, num_heads, segments, head_dim], [num_tokens, num_heads, segments] x 2: float32
        part_acc = torch.empty(num_tokens, num_heads, segments, head_dim, dtype=torch.float32, device=device)
        part_max = torch.empty(num_tokens, num_heads, segments, dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # placeholders; the kernel does not touch them
    out_stride_t = num_heads * head_dim
    scaled = k_scale is not None
    if scaled and v_scale is None:
        raise ValueError("paged_attention takes both k_scale and v_scale or neither")
    if rotary is None:  # the kernel reads none of these: the query stands in for the pointers
        positions = k_new = v_new = cos_sin = slots = query
        stride_cs = stride_kn = stride_vn = rot_half = 0
        mant, min_exp, fp8_max = _NOT_FP8
    else:
        positions, k_new, v_new, cos_sin, slots = rotary
        stride_cs, stride_kn, stride_vn = cos_sin.stride(0), k_new.stride(0), v_new.stride(0)
        rot_half = 0 if cos_sin.shape[-1] == head_dim else cos_sin.shape[-1] // 2  # partial rotary
        mant, min_exp, fp8_max = _FP8_FORMATS.get(k_cache.dtype, _NOT_FP8)
    windowed = sliding_window is not None
    if windowed and sliding_window < 1:
        raise ValueError(f"paged_attention: sliding_window must be >= 1; got {sliding_window}")
    if softcap is None:
        qk_scale, softcap_log2 = scale * _LOG2E, 0.0
    elif softcap > 0:  # the tanh takes scores / softcap; log2(e) comes after it
        qk_scale, softcap_log2 = scale / softcap, softcap * _LOG2E
    else:
        raise ValueError(f"paged_attention: softcap must be > 0; got {softcap}")
    # Constexprs passed positionally (a keyword costs a dict build per launch), in the kernel's order.
    _paged_attention_kernel[(grid_q, num_kv_heads, segments)](
        out, part_acc, part_max, part_sum, counters, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        qk_scale, sliding_window if windowed else 0, softcap_log2,
        # without scales the kernel reads none: the query stands in for their pointers
        k_scale if scaled else query, v_scale if scaled else query,
        positions, cos_sin, k_new, v_new, slots, num_seqs, num_heads, segments,
        qs[0], qs[1], out_stride_t, head_dim,
        ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        block_tables.stride(0), stride_cs, stride_kn, stride_vn,
        group,  # GROUP
        head_dim,  # HEAD_DIM
        block_size,  # BLOCK_SIZE
        tile,  # TILE
        block_m,  # BLOCK_M
        block_q,  # BLOCK_Q
        segments > 1,  # SPLIT
        plan.dot_precision,  # DOT_PRECISION
        scaled,  # KV_SCALED
        plan.pdl,  # PDL
        rotary is not None,  # ROTARY
        mant,  # FP8_MANT
        min_exp,  # FP8_MIN_EXP
        fp8_max,  # FP8_MAX
        widen,  # KV_WIDEN
        plan.hw_fp8_cvt,  # HW_CVT
        rot_half,  # ROT_HALF
        windowed,  # WINDOWED
        softcap is not None,  # SOFTCAP
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=plan.pdl,
    )  # fmt: skip
    return out
