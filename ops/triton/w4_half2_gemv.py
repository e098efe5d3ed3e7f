"""W4A16 GEMV in packed fp16 with the zero point folded into the decode, for 1-4 tokens on CUDA (up to 16
in groups of 4 rows, each group's programs decoding the tiles again).

Same weight layout as wna16_gemv.py (`qweight` int32 [K / 8, N], code i of a word at bits 4i, K along
the words; `scales` and `zeros` fp16 [G, N]) and the same split-K epilogue (ops.triton.split_k), but
with what the H200 showed about wna16_gemv's packed-fp16 path (265 instructions a thread per 4 KB
tile, gate_up at 0.56 of the copy bandwidth: bound by issue; the small layers ~5 us over their bytes:
bound by latency):

- Fewer instructions a word. A word's 8 codes become four fp16 pairs with one LOP3 each (two codes
  into the mantissas of 1024) and one packed FMA each that also removes the zero point:
  (1024 + c) / 16 - (64 + z / 16) = (c - z) / 16 (the high nibbles, 1024 + 16 c, take 1 / 256 and
  4 + z / 16). Exact in fp16 for integer zero points below 64 (every format weir reads stores
  integers), so no per-word sum of x is needed for the zero point. Four packed FMAs then multiply by
  x's fp16 pairs (x_j beside x_j+4, the pairs the nibble layout gives) into one fp16 pair, and the
  two words of a thread in one group (the tile is loaded as two half tiles, rows [0, W/2) and
  [W/2, W)) chain into the same pair: 8 products a lane before it goes to float32, once per group,
  times 16 s. About 13 instructions a word plus 4 per two words, where wna16_gemv's path spends ~20
  plus x's unpacking.
- x read as int32 pairs of its 16-bit elements (4 loads a word row, not 8) and converted to fp16
  pairs in registers (bf16: shift / mask to float32, one cvt per pair; fp16: one PRMT per pair).
- More in flight. Up to AHEAD tiles (words, scales and zero points: wna16_gemv left the scales
  for the loop to wait on) are requested before the tile being decoded, so a program's chain of
  memory round trips is about its tile count / AHEAD, not its tile count.

Accuracy: the dequantized weight (c - z) / 16 is exact in fp16; each lane rounds its running sum to
fp16 (relative 2**-11) over 8 products of magnitude at most |x|, then float32. x is rounded to fp16
(exact from bf16 within fp16's range): |x| up to ~8,000 is safe (65,504 / 8 products). The spec is
engine.model.quantization.common.dequantize + F.linear (tests/ops/test_w4_half2_gemv.py).

Layout conversions (META_2D, off: timed slower): compiled for sm_90 (triton 3.9 on CPU), the one-token launch's
loop moves each tile's per-column terms (add_lo, add_hi, scale16) from the 1-D layout their [BLOCK_N] loads
get to the tile's slice layout through shared memory: three round trips and six BAR.SYNCs a tile, at 128
registers a thread. Loading scales and zeros as [1, BLOCK_N] made Triton convert the word tiles instead
(worse); loaded as [HALF_W, BLOCK_N] tiles (every row the same columns, the redundant reads L1 hits) they
take the word tiles' own layout (8 words a thread along N) and the loop has no conversion and no barrier,
at 79 registers (tests/ops/test_kernels_compile.py checks both). Timed on an H200 at 9ab6f7f it was 2.6-9%
slower on every Llama-3-8B layer (`loadtest/peer_w4_gemv.py`'s weir_meta2d) and the GPTQ batch-1 step 3.1%
slower (loadtest/results/meta2d-stalls-2026-12-06/): the conversions are not what the loop waits on. The
planner keeps the 1-D loads; WEIR_W4_META_2D=1 plans it (engine/model/quantization/wna16.py).

What the loop waits on (H100 at 1396ef1, loadtest/results/w4-pipeline-stalls-h100-2026-12-07-1396ef1/): not the
bytes in flight (Triton's 3-stage cp.async pipeline of every load, `loop_stages=3` with META_2D: 72 registers,
~14 programs an SM with two tiles each in flight against 8 with one, tied on gate_up and lost elsewhere) and not
wave quantization (splits that fill whole waves lost). Compiled for sm_90 (triton 3.9, CPU), `ahead=2` keeps no
more in flight than `ahead=1`: the loop is not unrolled, so the tiles rotate through registers by MOVs at the top
of each iteration, and each MOV waits for the load it copies (issued one iteration earlier) before the next load
is issued. A loop two tiles a turn (each tile's words, scales, zero points and x in registers of their own,
so no copy at the end: built at 11d33cf, bit for bit the same outputs, compiled to 167 registers against 128) was
slower on an H100 on every layer (qkv 9.08 against 8.71 us, o 7.62 / 7.51, gate_up 30.00 / 27.80, down 18.42 /
15.14; 17.59 capped at 128 registers) and the GPTQ batch-1 step 2.714 -> 2.934 ms, so it was reverted
(loadtest/results/pdl-pingpong-h100-2026-12-07-11d33cf/): fewer programs an SM cost more than the copy's wait.
Column-blocked words (`col_blocked`, `col_blocked_qweight`) make each program's split one contiguous
run of bytes (the read probe's 0.84 -> ~0.9 of the copy bandwidth on gate_up); on an H100 at 55cf415 the GPTQ batch-1
step took 2.665 against 2.684 ms (-0.7%, Q1 0.490x -> 0.487x) for 64% more weight memory: not planned by default.

EMULATE (the Triton interpreter, CPU tests): the same kernel with each inline-PTX block replaced by
integer and float32 operations on the same bits (fp16 pairs kept as uint32, rounded to fp16 at the
same points; the FMAs round twice where the hardware rounds once). The PTX itself is compiled for
sm_90 on CPU (tests/ops/test_kernels_compile.py) and checked against the spec on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.l2_prefetch import l2_next_args, prefetch_next_weights
from ops.triton.pdl import let_next_kernel_start, pdl_enabled, wait_for_previous_kernel
from ops.triton.split_k import (
    MAX_TILES,
    gated_rows,
    k_splits,
    rows_per_program,
    split_counters,
    store_column_tiles,
)
from ops.triton.wna16_gemm import check_layout

MAX_ZERO_POINT = 63  # integer zero points up to here decode exactly (module docstring)
MAX_GEMV_TOKENS = 16  # rows of x in groups of up to 4, one group per program (each decodes its tiles)

# A word's four fp16 pairs (c - z) / 16: codes 0/4 and 2/6 (bits 0-3 / 16-19 of the word and of the
# word >> 8) over 1024 = 0x6400 times 1/16 = 0x2C00, codes 1/5 and 3/7 (bits 4-7 / 20-23: 1024 + 16 c)
# times 1/256 = 0x1C00; $5 / $6: the zero point's addends, -(64 + z / 16) and -(4 + z / 16). LUT 0xEA:
# (a & b) | c. Temporaries throughout: an output may share a register with an input.
_DECODE = tl.constexpr("""{
.reg .b32 w8, l0, h0, l1, h1, ml, mh;
mov.b32 ml, 0x2C002C00;
mov.b32 mh, 0x1C001C00;
lop3.b32 l0, $4, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 h0, $4, 0x00F000F0, 0x64006400, 0xEA;
shr.b32 w8, $4, 8;
lop3.b32 l1, w8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 h1, w8, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 l0, l0, ml, $5;
fma.rn.f16x2 h0, h0, mh, $6;
fma.rn.f16x2 l1, l1, ml, $5;
fma.rn.f16x2 h1, h1, mh, $6;
mov.b32 $0, l0;
mov.b32 $1, h0;
mov.b32 $2, l1;
mov.b32 $3, h1;
}""")

# acc + the four decoded pairs times x's pairs ($6..$9: (x0, x4), (x1, x5), (x2, x6), (x3, x7))
_DOT = tl.constexpr("""{
.reg .b32 t;
fma.rn.f16x2 t, $2, $6, $1;
fma.rn.f16x2 t, $3, $7, t;
fma.rn.f16x2 t, $4, $8, t;
fma.rn.f16x2 t, $5, $9, t;
mov.b32 $0, t;
}""")

# x's bf16 pairs (x0, x1) .. (x6, x7) as the fp16 pairs (x0, x4) .. (x3, x7): each value to float32 by
# a shift or a mask, then cvt.rn.f16x2.f32 d, hi, lo
_X_BF16 = tl.constexpr("""{
.reg .b32 a0, a1, a2, a3, a4, a5, a6, a7;
shl.b32 a0, $4, 16;
and.b32 a1, $4, 0xFFFF0000;
shl.b32 a2, $5, 16;
and.b32 a3, $5, 0xFFFF0000;
shl.b32 a4, $6, 16;
and.b32 a5, $6, 0xFFFF0000;
shl.b32 a6, $7, 16;
and.b32 a7, $7, 0xFFFF0000;
cvt.rn.f16x2.f32 $0, a4, a0;
cvt.rn.f16x2.f32 $1, a5, a1;
cvt.rn.f16x2.f32 $2, a6, a2;
cvt.rn.f16x2.f32 $3, a7, a3;
}""")

# fp16 x: (x0, x4) = bytes 0-1 of (x0, x1) and bytes 0-1 of (x4, x5), (x1, x5) the upper halves
_X_FP16 = tl.constexpr("""{
.reg .b32 t0, t1, t2, t3;
prmt.b32 t0, $4, $6, 0x5410;
prmt.b32 t1, $4, $6, 0x7632;
prmt.b32 t2, $5, $7, 0x5410;
prmt.b32 t3, $5, $7, 0x7632;
mov.b32 $0, t0;
mov.b32 $1, t1;
mov.b32 $2, t2;
mov.b32 $3, t3;
}""")

# the fp16 pair's two lanes summed in float32
_HSUM = tl.constexpr("""{
.reg .b16 s0, s1;
.reg .f32 f0, f1;
mov.b32 {s0, s1}, $1;
cvt.f32.f16 f0, s0;
cvt.f32.f16 f1, s1;
add.f32 $0, f0, f1;
}""")


@triton.jit
def _lanes(v):
    """(lo, hi) float32: the two fp16 lanes of uint32 pairs (EMULATE)."""
    lo = (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _pair(lo, hi):
    """uint32 fp16 pairs of float32 lo and hi, each rounded to nearest (EMULATE)."""
    lo16 = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    hi16 = hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return lo16 | (hi16 << 16)


@triton.jit
def _fma_pair(a, b, c):
    """a * b + c on fp16 pairs (EMULATE: float32, then rounded)."""
    a_lo, a_hi = _lanes(a)
    b_lo, b_hi = _lanes(b)
    c_lo, c_hi = _lanes(c)
    return _pair(a_lo * b_lo + c_lo, a_hi * b_hi + c_hi)


@triton.jit
def _splat(v, EMULATE: tl.constexpr):
    """uint32 fp16 pairs (v, v) of float32 v."""
    if EMULATE:
        return _pair(v, v)
    return tl.inline_asm_elementwise(
        "cvt.rn.f16x2.f32 $0, $1, $1;", "=r,f", [v], dtype=tl.uint32, is_pure=True, pack=1
    )


@triton.jit
def _decode(words, add_lo, add_hi, EMULATE: tl.constexpr):
    """A word's codes as four fp16 pairs (c - z) / 16: codes (0, 4), (1, 5), (2, 6), (3, 7)."""
    if EMULATE:
        w8 = words >> 8
        lo_mul = _splat(tl.full(words.shape, 0.0625, tl.float32), True)
        hi_mul = _splat(tl.full(words.shape, 0.00390625, tl.float32), True)
        d0 = _fma_pair((words & 0x000F000F) | 0x64006400, lo_mul, add_lo)
        d1 = _fma_pair((words & 0x00F000F0) | 0x64006400, hi_mul, add_hi)
        d2 = _fma_pair((w8 & 0x000F000F) | 0x64006400, lo_mul, add_lo)
        d3 = _fma_pair((w8 & 0x00F000F0) | 0x64006400, hi_mul, add_hi)
        return d0, d1, d2, d3
    return tl.inline_asm_elementwise(
        _DECODE, "=r,=r,=r,=r,r,r,r", [words, add_lo, add_hi],
        dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32), is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _dot(acc, d0, d1, d2, d3, p0, p1, p2, p3, EMULATE: tl.constexpr):
    """acc + sum_j d_j * p_j on fp16 pairs, in that order."""
    if EMULATE:
        acc = _fma_pair(d0, p0, acc)
        acc = _fma_pair(d1, p1, acc)
        acc = _fma_pair(d2, p2, acc)
        return _fma_pair(d3, p3, acc)
    return tl.inline_asm_elementwise(
        _DOT, "=r,r,r,r,r,r,r,r,r,r", [acc, d0, d1, d2, d3, p0, p1, p2, p3],
        dtype=tl.uint32, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _hsum(acc, EMULATE: tl.constexpr):
    """float32: the pair's lanes summed."""
    if EMULATE:
        lo, hi = _lanes(acc)
        return lo + hi
    return tl.inline_asm_elementwise(_HSUM, "=f,r", [acc], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _x_raw(x_ptrs, offset):
    """One row of x at a half tile's words ([HALF_W] int32 pointers at each word's first pair, plus a
    constant offset): its pairs (x0, x1), (x2, x3), (x4, x5), (x6, x7) as loaded, [HALF_W] uint32 each."""
    q0 = tl.load(x_ptrs + offset).to(tl.uint32, bitcast=True)
    q1 = tl.load(x_ptrs + offset + 1).to(tl.uint32, bitcast=True)
    q2 = tl.load(x_ptrs + offset + 2).to(tl.uint32, bitcast=True)
    q3 = tl.load(x_ptrs + offset + 3).to(tl.uint32, bitcast=True)
    return q0, q1, q2, q3


@triton.jit
def _x_tile_raw(x_ptrs, half_offset):
    """One row of x under a tile, as loaded: the first half tile's four pairs, then the second's."""
    qa0, qa1, qa2, qa3 = _x_raw(x_ptrs, 0)
    qb0, qb1, qb2, qb3 = _x_raw(x_ptrs, half_offset)
    return qa0, qa1, qa2, qa3, qb0, qb1, qb2, qb3


@triton.jit
def _x_pairs(q0, q1, q2, q3, X_BF16: tl.constexpr, EMULATE: tl.constexpr):
    """x's loaded pairs (x0, x1) .. (x6, x7) as the fp16 pairs (x0, x4), (x1, x5), (x2, x6), (x3, x7)."""
    if EMULATE:
        if X_BF16:  # a bf16 is the upper half of its float32
            x0 = (q0 << 16).to(tl.float32, bitcast=True)
            x1 = (q0 & 0xFFFF0000).to(tl.float32, bitcast=True)
            x2 = (q1 << 16).to(tl.float32, bitcast=True)
            x3 = (q1 & 0xFFFF0000).to(tl.float32, bitcast=True)
            x4 = (q2 << 16).to(tl.float32, bitcast=True)
            x5 = (q2 & 0xFFFF0000).to(tl.float32, bitcast=True)
            x6 = (q3 << 16).to(tl.float32, bitcast=True)
            x7 = (q3 & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            x0, x1 = _lanes(q0)
            x2, x3 = _lanes(q1)
            x4, x5 = _lanes(q2)
            x6, x7 = _lanes(q3)
        return _pair(x0, x4), _pair(x1, x5), _pair(x2, x6), _pair(x3, x7)
    return tl.inline_asm_elementwise(
        _X_BF16 if X_BF16 else _X_FP16, "=r,=r,=r,=r,r,r,r,r", [q0, q1, q2, q3],
        dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32), is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _row_terms(acc, da0, da1, da2, da3, db0, db1, db2, db3, x_ptrs, offset, half_offset, scale16,
               X_BF16: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """acc + one row's group sums over a tile (its two half tiles chained in one fp16 pair per word row
    and column) times 16 s. da / db: the half tiles' decoded pairs; half_offset: the second half
    tile's distance in x's int32 pairs."""
    qa0, qa1, qa2, qa3 = _x_raw(x_ptrs, offset)
    qb0, qb1, qb2, qb3 = _x_raw(x_ptrs, offset + half_offset)
    return _row_dot(acc, da0, da1, da2, da3, db0, db1, db2, db3, qa0, qa1, qa2, qa3, qb0, qb1, qb2, qb3,
                    scale16, X_BF16, EMULATE)  # fmt: skip


@triton.jit
def _row_dot(acc, da0, da1, da2, da3, db0, db1, db2, db3, qa0, qa1, qa2, qa3, qb0, qb1, qb2, qb3, scale16,
             X_BF16: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """_row_terms on x's pairs as loaded (qa: the first half tile's, qb: the second's)."""
    a0, a1, a2, a3 = _x_pairs(qa0, qa1, qa2, qa3, X_BF16, EMULATE)
    b0, b1, b2, b3 = _x_pairs(qb0, qb1, qb2, qb3, X_BF16, EMULATE)
    pairs = tl.zeros(da0.shape, dtype=tl.uint32)
    pairs = _dot(pairs, da0, da1, da2, da3, a0[:, None], a1[:, None], a2[:, None], a3[:, None], EMULATE)
    pairs = _dot(pairs, db0, db1, db2, db3, b0[:, None], b1[:, None], b2[:, None], b3[:, None], EMULATE)
    return acc + _hsum(pairs, EMULATE) * scale16


@triton.jit
def _load_tile(word_ptrs, scale_ptrs, zero_ptrs, k, stride_qk, stride_sg, stride_zg, mask_n,
               GROUP_SIZE: tl.constexpr, HALF_W: tl.constexpr, EVEN_N: tl.constexpr, META_2D: tl.constexpr):  # fmt: skip
    """The tile at K = k: its two half tiles of words ([HALF_W, BLOCK_N] uint32 each), and its group's
    scales and zero points ([BLOCK_N] fp16; META_2D: [HALF_W, BLOCK_N], every row the same, from
    [HALF_W, BLOCK_N] pointers)."""
    rows = k // 8 * stride_qk
    g = k // GROUP_SIZE
    if EVEN_N:
        a = tl.load(word_ptrs + rows)
        b = tl.load(word_ptrs + rows + HALF_W * stride_qk)
    else:
        a = tl.load(word_ptrs + rows, mask=mask_n[None, :], other=0)
        b = tl.load(word_ptrs + rows + HALF_W * stride_qk, mask=mask_n[None, :], other=0)
    if META_2D and EVEN_N:
        scale = tl.load(scale_ptrs + g * stride_sg)
        zero = tl.load(zero_ptrs + g * stride_zg)
    elif META_2D:
        scale = tl.load(scale_ptrs + g * stride_sg, mask=mask_n[None, :], other=0.0)
        zero = tl.load(zero_ptrs + g * stride_zg, mask=mask_n[None, :], other=0.0)
    else:
        scale = tl.load(scale_ptrs + g * stride_sg, mask=mask_n, other=0.0)
        zero = tl.load(zero_ptrs + g * stride_zg, mask=mask_n, other=0.0)
    return a.to(tl.uint32, bitcast=True), b.to(tl.uint32, bitcast=True), scale, zero


@triton.jit
def _w4_half2_gemv_kernel(
    x_ptr,  # [M, K / 2] int32: x's 16-bit elements in pairs
    qweight_ptr,  # [K / 8, N] int32
    scales_ptr,  # [G, N] fp16
    zeros_ptr,  # [G, N] fp16, integers in [0, MAX_ZERO_POINT]
    out_ptr,  # [M, N] (gated: [M, N / 2]) in x's dtype
    partials_ptr,  # [SPLIT_K, M, N] float32 (gated: the tiles' virtual columns)
    counters_ptr,  # [tiles] int32
    M,
    N,
    K,
    k_per_split,  # K rows per split, whole tiles
    stride_xm,  # in int32 pairs
    stride_qk,
    stride_sg,
    stride_zg,
    stride_om,
    X_BF16: tl.constexpr,  # x is bf16 (else fp16)
    GROUP_SIZE: tl.constexpr,
    ROWS: tl.constexpr,  # rows of x per program: 1, 2 or 4 (M a multiple), the decode shared
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP_SIZE: a tile lies in one group
    SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    AHEAD: tl.constexpr,  # tiles requested before the one decoded: 0, 1 or 2
    X_AHEAD: tl.constexpr,  # AHEAD 1: x's pairs (every row's) for the next tile requested with it too
    LOOP_STAGES: tl.constexpr,  # > 1: Triton's own pipelining of the loop's loads instead (cp.async)
    PDL: tl.constexpr,
    EMULATE: tl.constexpr,  # no inline PTX (the interpreter): the same arithmetic in integer / float32 ops
    GATED: tl.constexpr = False,  # [gate | up] columns (N = 2 x half_n): silu(gate) * up stored
    META_2D: tl.constexpr = False,  # scales / zeros loaded as the word tiles' shape (module docstring)
    COL_BLOCKED: tl.constexpr = False,  # qweight [tiles, K / 8, BLOCK_N]: each program's words one contiguous run
    half_n=0,
    prefetch_ptr=None,  # (L2_PREFETCH) bytes of the next projection's weights (ops/triton/l2_prefetch.py)
    prefetch_bytes=0,
    prefetch_second=0,  # > 0: a second range at this byte offset (a [gate; up] weight's up half)
    L2_PREFETCH: tl.constexpr = False,
):
    HALF_W: tl.constexpr = BLOCK_K // 16  # word rows of each half tile
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    tile = pid_g * tl.num_programs(1) + pid_n
    row0 = pid_g * ROWS
    if GATED:
        offs_n, mask_n = gated_rows(pid_n, half_n, BLOCK_N)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    offs_w = tl.arange(0, HALF_W)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    k_last = k_end - BLOCK_K  # the split's last tile (K is whole groups, so whole tiles)
    if COL_BLOCKED:  # the tile's own [K / 8, BLOCK_N] block (gated: its virtual columns, gate then up)
        block = qweight_ptr + pid_n.to(tl.int64) * (K // 8) * BLOCK_N
        word_ptrs = block + offs_w[:, None] * stride_qk + tl.arange(0, BLOCK_N)[None, :]  # stride_qk: BLOCK_N
    else:
        word_ptrs = qweight_ptr + offs_w[:, None] * stride_qk + offs_n[None, :]  # [HALF_W, BLOCK_N] at K = 0
    if META_2D:  # [HALF_W, BLOCK_N], each row the same columns: Triton gives them the word tiles' layout
        scale_ptrs = scales_ptr + offs_w[:, None] * 0 + offs_n[None, :]
        zero_ptrs = zeros_ptr + offs_w[:, None] * 0 + offs_n[None, :]
    else:  # [BLOCK_N]
        scale_ptrs = scales_ptr + offs_n
        zero_ptrs = zeros_ptr + offs_n
    acc0 = tl.zeros((HALF_W, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((HALF_W, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((HALF_W, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((HALF_W, BLOCK_N), dtype=tl.float32)
    # Weights, scales and zero points do not depend on the kernel before: requested before the wait.
    if AHEAD >= 1:
        a, b, s, z = _load_tile(word_ptrs, scale_ptrs, zero_ptrs, k_start, stride_qk, stride_sg, stride_zg,
                                mask_n, GROUP_SIZE, HALF_W, EVEN_N, META_2D)  # fmt: skip
    if AHEAD >= 2:
        a1, b1, s1, z1 = _load_tile(word_ptrs, scale_ptrs, zero_ptrs, tl.minimum(k_start + BLOCK_K, k_last),
                                    stride_qk, stride_sg, stride_zg, mask_n, GROUP_SIZE, HALF_W, EVEN_N, META_2D)  # fmt: skip
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    half_offset = HALF_W * 4  # int32 pairs of x under a half tile
    x_row = x_ptr + row0 * stride_xm + offs_w * 4  # [HALF_W] int32: row0's x at each word of K = 0
    if X_AHEAD:  # x is the previous kernel's output: read after the wait
        x_first = x_row + k_start // 2
        xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3 = _x_tile_raw(x_first, half_offset)
        if ROWS >= 2:
            ya0, ya1, ya2, ya3, yb0, yb1, yb2, yb3 = _x_tile_raw(x_first + stride_xm, half_offset)
        if ROWS >= 4:
            ua0, ua1, ua2, ua3, ub0, ub1, ub2, ub3 = _x_tile_raw(x_first + 2 * stride_xm, half_offset)
            va0, va1, va2, va3, vb0, vb1, vb2, vb3 = _x_tile_raw(x_first + 3 * stride_xm, half_offset)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=LOOP_STAGES):
        if AHEAD >= 1:  # request the tile AHEAD further (the last ones re-read the split's last tile)
            an, bn, sn, zn = _load_tile(word_ptrs, scale_ptrs, zero_ptrs, tl.minimum(k0 + AHEAD * BLOCK_K, k_last),
                                        stride_qk, stride_sg, stride_zg, mask_n, GROUP_SIZE, HALF_W, EVEN_N, META_2D)  # fmt: skip
        else:
            a, b, s, z = _load_tile(word_ptrs, scale_ptrs, zero_ptrs, k0, stride_qk, stride_sg, stride_zg,
                                    mask_n, GROUP_SIZE, HALF_W, EVEN_N, META_2D)  # fmt: skip
        zf = z.to(tl.float32)
        add_lo = _splat(-64.0 - zf * 0.0625, EMULATE)  # (1024 + c) / 16 - 64 - z / 16
        add_hi = _splat(-4.0 - zf * 0.0625, EMULATE)  # (1024 + 16 c) / 256 - 4 - z / 16
        scale16 = s.to(tl.float32) * 16.0
        if not META_2D:  # [BLOCK_N] -> [1, BLOCK_N]
            add_lo = add_lo[None, :]
            add_hi = add_hi[None, :]
            scale16 = scale16[None, :]
        da0, da1, da2, da3 = _decode(a, add_lo, add_hi, EMULATE)
        db0, db1, db2, db3 = _decode(b, add_lo, add_hi, EMULATE)
        if X_AHEAD:  # this tile's x came with it; the next tile's is requested now (rows in turn)
            x_next = x_row + tl.minimum(k0 + BLOCK_K, k_last) // 2
            na0, na1, na2, na3, nb0, nb1, nb2, nb3 = _x_tile_raw(x_next, half_offset)
            acc0 = _row_dot(acc0, da0, da1, da2, da3, db0, db1, db2, db3, xa0, xa1, xa2, xa3, xb0, xb1, xb2,
                            xb3, scale16, X_BF16, EMULATE)  # fmt: skip
            xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3 = na0, na1, na2, na3, nb0, nb1, nb2, nb3
            if ROWS >= 2:
                na0, na1, na2, na3, nb0, nb1, nb2, nb3 = _x_tile_raw(x_next + stride_xm, half_offset)
                acc1 = _row_dot(acc1, da0, da1, da2, da3, db0, db1, db2, db3, ya0, ya1, ya2, ya3, yb0, yb1, yb2,
                                yb3, scale16, X_BF16, EMULATE)  # fmt: skip
                ya0, ya1, ya2, ya3, yb0, yb1, yb2, yb3 = na0, na1, na2, na3, nb0, nb1, nb2, nb3
            if ROWS >= 4:
                na0, na1, na2, na3, nb0, nb1, nb2, nb3 = _x_tile_raw(x_next + 2 * stride_xm, half_offset)
                acc2 = _row_dot(acc2, da0, da1, da2, da3, db0, db1, db2, db3, ua0, ua1, ua2, ua3, ub0, ub1, ub2,
                                ub3, scale16, X_BF16, EMULATE)  # fmt: skip
                ua0, ua1, ua2, ua3, ub0, ub1, ub2, ub3 = na0, na1, na2, na3, nb0, nb1, nb2, nb3
                na0, na1, na2, na3, nb0, nb1, nb2, nb3 = _x_tile_raw(x_next + 3 * stride_xm, half_offset)
                acc3 = _row_dot(acc3, da0, da1, da2, da3, db0, db1, db2, db3, va0, va1, va2, va3, vb0, vb1, vb2,
                                vb3, scale16, X_BF16, EMULATE)  # fmt: skip
                va0, va1, va2, va3, vb0, vb1, vb2, vb3 = na0, na1, na2, na3, nb0, nb1, nb2, nb3
        else:
            x_ptrs = x_row + k0 // 2
            acc0 = _row_terms(acc0, da0, da1, da2, da3, db0, db1, db2, db3, x_ptrs, 0, half_offset, scale16,
                              X_BF16, EMULATE)  # fmt: skip
            if ROWS >= 2:
                acc1 = _row_terms(acc1, da0, da1, da2, da3, db0, db1, db2, db3, x_ptrs, stride_xm, half_offset,
                                  scale16, X_BF16, EMULATE)  # fmt: skip
            if ROWS >= 4:
                acc2 = _row_terms(acc2, da0, da1, da2, da3, db0, db1, db2, db3, x_ptrs, 2 * stride_xm, half_offset,
                                  scale16, X_BF16, EMULATE)  # fmt: skip
                acc3 = _row_terms(acc3, da0, da1, da2, da3, db0, db1, db2, db3, x_ptrs, 3 * stride_xm, half_offset,
                                  scale16, X_BF16, EMULATE)  # fmt: skip
        if AHEAD == 1:
            a, b, s, z = an, bn, sn, zn
        if AHEAD == 2:
            a, b, s, z = a1, b1, s1, z1
            a1, b1, s1, z1 = an, bn, sn, zn
    if L2_PREFETCH:  # this program's tiles are read: its slice of the next weights
        prefetch_next_weights(prefetch_ptr, prefetch_bytes, prefetch_second)
    store_column_tiles(acc0, acc1, acc2, acc3, out_ptr, partials_ptr, counters_ptr, tile, row0, M, N, half_n, offs_n,
                       pid_n, stride_om, pid_k, ROWS, SPLIT_K, BLOCK_N, GATED)  # fmt: skip


def w4_half2_gemv(
    x: torch.Tensor,  # [M, K] bfloat16 / float16, M <= MAX_GEMV_TOKENS
    qweight: torch.Tensor,  # [K / 8, N] int32
    scales: torch.Tensor,  # [G, N] fp16
    zeros: torch.Tensor,  # [G, N] fp16, integers in [0, MAX_ZERO_POINT]
    group_size: int,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 8,
    num_warps: int = 4,
    ahead: int = 1,
    loop_stages: int = 1,
    gated: bool = False,
    x_ahead: bool = False,
    l2_next: torch.Tensor | None = None,  # [bytes] uint8: asked of L2 as the programs finish
    max_registers: int | None = None,
    meta_2d: bool = False,
    col_blocked: bool = False,
) -> torch.Tensor:  # [M, N] in x.dtype; gated: [M, N / 2]
    """y = x w for 4-bit codes, w[k, n] = (code - zero) * scale. block_k divides group_size (at least
    16); split_k splits K over that many programs per column tile (whole tiles each); ahead: tiles in
    flight ahead of the decoded one; loop_stages > 1: Triton pipelines the loads instead; gated: a
    [gate | up] weight, silu(gate) * up stored (N / 2 columns); x_ahead (ahead 1): x's next pairs
    requested with the next tile (one row: 8-11% a layer on an H200, planned; 2-4 rows: not measured
    yet, a sweep option); l2_next: the next projection's weight bytes (a flat uint8 view, 16-byte
    aligned, or [2, n] for two ranges: l2_prefetch.l2_next_args), each program asking L2 for its slice once its tiles are read (ops/triton/l2_prefetch.py;
    sm_90, the outputs unchanged); max_registers: ptxas's cap a thread (Triton's maxnreg; None: its own
    choice, 128 at the one-token launch), more programs resident an SM at the cost of spills (a sweep
    knob: 96 / 80 / 72 were no faster on any Llama-3-8B layer on an H100, loadtest/peer_w4_gemv.py);
    meta_2d: scales and zero points loaded in the word tiles' shape and layout (module docstring; the
    same outputs bit for bit; timed slower, planned only with WEIR_W4_META_2D=1); col_blocked: qweight
    is `col_blocked_qweight(qweight, block_n, gated)`, [tiles, K / 8, block_n], so a program reads its split
    as one contiguous run instead of 256-byte rows 4 N bytes apart (the same outputs bit for bit). The zero
    points must be integers in
    [0, MAX_ZERO_POINT] (not checked here: a device sync per call; the engine checks at load)."""
    M, K = x.shape
    N = scales.shape[1]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"w4_half2_gemv: x must be bfloat16 or float16; got {x.dtype}")
    if not 1 <= M <= MAX_GEMV_TOKENS:
        raise ValueError(f"w4_half2_gemv takes 1 to {MAX_GEMV_TOKENS} rows; got {M}")
    if col_blocked:
        blocked = (triton.cdiv(N, block_n), K // 8, block_n)
        if tuple(qweight.shape) != blocked or not qweight.is_contiguous():
            raise ValueError(
                f"w4_half2_gemv: a column-blocked qweight for K={K}, N={N}, block_n {block_n} is a contiguous "
                f"{blocked}; got {tuple(qweight.shape)}"
            )
        words = torch.empty(K // 8, N, device="meta")  # the row-major words' shape, nothing allocated
        check_layout(words, scales, zeros, K, 4, group_size)
    else:
        check_layout(qweight, scales, zeros, K, 4, group_size)
    if group_size % block_k or block_k % 16:
        raise ValueError(f"block_k {block_k} must divide group_size {group_size} and be a multiple of 16")
    if ahead not in (0, 1, 2):
        raise ValueError(f"w4_half2_gemv: ahead is 0, 1 or 2; got {ahead}")
    if x_ahead and ahead != 1:
        raise ValueError(f"w4_half2_gemv: x_ahead takes ahead 1; got ahead {ahead}")
    if gated and (N % 2 or block_n % 2):
        raise ValueError(
            f"w4_half2_gemv: gated needs an even column count and block_n; got {N}, block_n {block_n}"
        )
    if qweight.stride(-1) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1:
        raise ValueError(
            "w4_half2_gemv: qweight, scales and zeros must be contiguous along their last dimension"
        )
    rows = rows_per_program(M)
    if M % rows:  # the kernel masks no row: zero rows up to whole groups
        padded = torch.cat([x, x.new_zeros(rows - M % rows, K)])
        return w4_half2_gemv(padded, qweight, scales, zeros, group_size, block_n, block_k, split_k, num_warps,
                             ahead, loop_stages, gated, x_ahead, l2_next, max_registers, meta_2d,
                             col_blocked)[:M]  # fmt: skip
    if x.stride(1) != 1 or x.stride(0) % 2 or x.storage_offset() % 2:
        x = x.contiguous()
    x_pairs = x.view(torch.int32)  # [M, K / 2]
    k_per_split, split_k = k_splits(K, split_k, block_k)
    out_n = N // 2 if gated else N
    tiles = triton.cdiv(out_n, block_n // 2) if gated else triton.cdiv(N, block_n)
    groups = M // rows
    if split_k > 1 and tiles * groups > MAX_TILES:
        raise ValueError(f"w4_half2_gemv: {tiles * groups} tiles exceed the split-K workspace ({MAX_TILES})")
    out = torch.empty(M, out_n, dtype=x.dtype, device=x.device)
    partial_n = tiles * block_n if gated else N
    partials = (
        torch.empty(split_k, M, partial_n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    )
    pdl = pdl_enabled(x.device)
    l2_bytes, l2_second = l2_next_args("w4_half2_gemv", l2_next)
    options = {} if max_registers is None or x.device.type != "cuda" else {"maxnreg": max_registers}
    _w4_half2_gemv_kernel[(groups, tiles, split_k)](
        x_pairs, qweight, scales, zeros, out, partials, split_counters(x.device),
        M, N, K, k_per_split,
        x_pairs.stride(0), block_n if col_blocked else qweight.stride(0), scales.stride(0), zeros.stride(0),
        out.stride(0),
        X_BF16=x.dtype == torch.bfloat16, GROUP_SIZE=group_size, ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, EVEN_N=out_n % (block_n // 2) == 0 if gated else N % block_n == 0, AHEAD=ahead,
        X_AHEAD=x_ahead, LOOP_STAGES=loop_stages, PDL=pdl, EMULATE=x.device.type != "cuda", GATED=gated, half_n=out_n,
        META_2D=meta_2d, COL_BLOCKED=col_blocked,
        prefetch_ptr=out if l2_next is None else l2_next,
        prefetch_bytes=l2_bytes,
        prefetch_second=l2_second,
        L2_PREFETCH=l2_next is not None and x.device.type == "cuda",
        num_warps=num_warps, launch_pdl=pdl, **options,
    )  # fmt: skip
    return out


def col_blocked_qweight(qweight: torch.Tensor, block_n: int, gated: bool = False) -> torch.Tensor:
    """qweight [K / 8, N] int32 as `w4_half2_gemv(col_blocked=True)` reads it: [tiles, K / 8, block_n], tile t
    holding the columns its program decodes (gated: block_n / 2 gate columns from t * block_n / 2, then the
    same up columns, N / 2 further), a ragged last tile padded with zero words. One program's split of K is
    then one contiguous run of bytes (H200 read probe at ea9949b: gate_up's words in the row-major column
    tiles at 0.84 of the copy bandwidth, a flat read at 0.94; loadtest/results/folded-gemv-h200-2026-12-04)."""
    kw, n = qweight.shape
    half = block_n // 2
    if gated:
        if n % 2 or block_n % 2:
            raise ValueError(f"col_blocked_qweight: gated needs an even N and block_n; got {n}, {block_n}")
        tiles = triton.cdiv(n // 2, half)
        virtual = torch.arange(tiles * block_n, device=qweight.device)  # [tiles * block_n]
        col = virtual // block_n * half + virtual % half
        source = col + (virtual % block_n >= half) * (n // 2)
        valid = col < n // 2
    else:
        tiles = triton.cdiv(n, block_n)
        source = torch.arange(tiles * block_n, device=qweight.device)
        valid = source < n
    picked = qweight.index_select(1, torch.where(valid, source, 0))  # [K / 8, tiles * block_n]
    picked *= valid.to(qweight.dtype)  # the padding columns' words 0
    return picked.view(kw, tiles, block_n).permute(1, 0, 2).contiguous()  # [tiles, K / 8, block_n]
