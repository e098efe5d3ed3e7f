"""Few rows of x times a 4-bit weight on tensor cores: y [M, N] = x [M, K] @ w [K, N] for M <= 256, where
w[k, n] = (code[k, n] - zero[g, n]) * scale[g, n] in GPTQ's layout (`qweight` int32 [K / 8, N], code i of
a word at bits 4i; `scales`, `zeros` fp16 [G, N], groups of GROUP_SIZE along K). The engine runs it at 3-255
tokens (engine.model.quantization.wna16.plan_w4_skinny), past 16 in row tiles of 32, 64 or 128 (block_m).

The W4A16 GEMM (ops/triton/wna16_gemm.py) decodes each code to float32 (shift, mask, int-to-float, subtract,
multiply, round to x's dtype): the conversions run at a quarter of the ALU rate, so at 8-16 tokens it is
bound by its decode, not by its bytes (0.28 of the copy bandwidth on an H100). Here a code becomes a 16-bit
float without a conversion: one LOP3 ORs two codes into the mantissas of a pair of 128.0 (bf16 0x4300) or
1024.0 (fp16 0x6400), whose last four mantissa bits are whole units, and one packed FMA subtracts the pair
128 + z (or 1024 + z): exactly c - z for the integer zero points every format stores (up to 63 here, as the
folded GEMV). Then either
- `scaled` (what the engine runs): one packed multiply by the scale, rounding (c - z) s to x's 16-bit type
  as the W4A16 GEMM does, and the dot accumulates across tiles, so Triton keeps each tile's MMA in flight
  while the next one decodes (H100, 8 tokens: gate_up 40.2 us, against 59.8 without and the GEMM's 74.7); or
- the exact tile c - z into the MMA and the scale on its float32 sums per group, which makes every product
  exact (relative error 1.7e-3 against 2.9e-3 scaled, both at bf16 output rounding) but waits for each MMA.

As in ops/triton/skinny_gemm.py the weight is the wide operand ("swap AB"): each program owns BLOCK_N
columns and a K range and multiplies [BLOCK_N, BLOCK_K] weight tiles by x^T [BLOCK_K, BLOCK_M] (BLOCK_M
16, the MMA's smallest; x's missing rows masked to zero), a tile inside one group (BLOCK_K divides
GROUP_SIZE). The words and x^T are copied asynchronously by Triton's pipeline (num_stages), the scales and
zero points loaded one tile ahead by hand. K is split over SPLIT_K programs per column tile, summed by the
tile's last program (ops.triton.split_k's tickets): one launch. Scaled tiles may span groups (each word row
decoded with its own group's scale and zero point); 256-deep tiles over two 128-groups measured slower at
every Llama-3-8B shape (H100, c133de5: gate_up at 8 tokens 54.88 against 41.36 us), so the planner keeps 128. What bounds it (~0.5 of the copy bandwidth
scaled): each tile goes through shared memory between the decode and the MMA, since Triton has no register
path from the decode's blocked layout to the MMA's operand layout. (Letting each element of a [BLOCK_N, BLOCK_K]
tile load its own word, so the decode could run in the operand layout, compiled for sm_90 by triton 3.9 to
8x the words' bytes in cp.async copies and still a conversion through shared memory: not a way round it.)

Not launched with PDL (ops/triton/pdl.py): with the first scales and zero points read before the wait and the
pipelined loop after it, L1's GPTQ step at batch 8 went 3.71 -> 4.04 ms on an H100 (e507e83; ops/triton/skinny_gemm.py).

The spec is engine.model.quantization.common.dequantize + F.linear (tests/ops/test_w4_skinny_gemm.py,
under TRITON_INTERPRET=1 on CPU; on CUDA by loadtest/probe_tinygemm.py and the GPU checks). The interpreter
(triton 3.9) miscasts integers to bf16 and multiplies 16-bit dot operands wrongly, so there (EMULATE) the
decode runs in integer and float32 operations and the dot in float32: the same exact products (scaled: the
same 16-bit weights, but rounded by the interpreter's truncating cast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.split_k import MAX_TILES, k_splits, split_counters, store_swapped_tile
from ops.triton.wna16_gemm import check_layout

MAX_ROWS = 256  # rows of x, in tiles of block_m (16: the MMA's smallest; the engine takes this kernel to 255)


# A word's 8 codes (code i at bits 4i) minus the zero point, as 16-bit floats $0..$7: one LOP3 puts codes i
# and i + 4 into the mantissas of a pair of $10 (bf16 128.0: 0x4300; fp16 1024.0: 0x6400; either's last 4
# mantissa bits are whole units), one packed FMA adds $9, the pair -(128 + z) (or -(1024 + z)): exactly
# c - z. $11: the pair (1.0, 1.0); SCALED: one packed multiply by $12, the pair (s, s), rounds (c - z) s to
# 16 bits. The halves go out in K order (the tile's 16-byte rows then take a PRMT per pair, which keeps x^T's
# rows contiguous: Triton copies them asynchronously, 16 bytes at a time).
_DECODE = """{
.reg .b32 w4, w8, w12, p0, p1, p2, p3;
lop3.b32 p0, $8, 0x000F000F, $10, 0xEA;
shr.b32 w4, $8, 4;
lop3.b32 p1, w4, 0x000F000F, $10, 0xEA;
shr.b32 w8, $8, 8;
lop3.b32 p2, w8, 0x000F000F, $10, 0xEA;
shr.b32 w12, $8, 12;
lop3.b32 p3, w12, 0x000F000F, $10, 0xEA;
fma.rn.TYPE p0, p0, $11, $9;
fma.rn.TYPE p1, p1, $11, $9;
fma.rn.TYPE p2, p2, $11, $9;
fma.rn.TYPE p3, p3, $11, $9;
SCALE
mov.b32 {$0, $4}, p0;
mov.b32 {$1, $5}, p1;
mov.b32 {$2, $6}, p2;
mov.b32 {$3, $7}, p3;
}"""
_SCALE = (
    "mul.rn.TYPE p0, p0, $12;\nmul.rn.TYPE p1, p1, $12;\nmul.rn.TYPE p2, p2, $12;\nmul.rn.TYPE p3, p3, $12;"
)
_DECODE_BF16 = tl.constexpr(_DECODE.replace("SCALE\n", "").replace("TYPE", "bf16x2"))
_DECODE_FP16 = tl.constexpr(_DECODE.replace("SCALE\n", "").replace("TYPE", "f16x2"))
_DECODE_SCALED_BF16 = tl.constexpr(_DECODE.replace("SCALE", _SCALE).replace("TYPE", "bf16x2"))
_DECODE_SCALED_FP16 = tl.constexpr(_DECODE.replace("SCALE", _SCALE).replace("TYPE", "f16x2"))
_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r")  # 8 16-bit outputs; words, $9, $10, $11, $12


@triton.jit
def _emulated_code(words, zero, scale, i: tl.constexpr, SCALED: tl.constexpr, X_FP16: tl.constexpr):
    """code i of each word minus the zero point, float32 (EMULATE); SCALED: times the scale, rounded to x's type."""
    d = ((words >> (4 * i)) & 0xF).to(tl.float32) - zero
    if SCALED:
        d = (d * scale).to(tl.float16 if X_FP16 else tl.bfloat16).to(tl.float32)
    return d


@triton.jit
def _pairs(v, dtype: tl.constexpr):
    """uint32 pairs (v, v) of float32 v [1, C] rounded to dtype (16 bits)."""
    half = v.to(dtype).to(tl.uint16, bitcast=True).to(tl.uint32)
    return half | (half << 16)


@triton.jit
def _decode_asm(words, zero, scale, SCALED: tl.constexpr, X_FP16: tl.constexpr):
    """_DECODE on [R, C] words with zero and scale [1, C] (or [R, C]) float32: eight [R, C] tensors of x's
    16-bit type (the unscaled decode leaves $12 unread)."""
    dtype: tl.constexpr = tl.float16 if X_FP16 else tl.bfloat16
    base: tl.constexpr = 1024.0 if X_FP16 else 128.0
    magic: tl.constexpr = 0x64006400 if X_FP16 else 0x43004300
    one: tl.constexpr = 0x3C003C00 if X_FP16 else 0x3F803F80
    if X_FP16:
        asm: tl.constexpr = _DECODE_SCALED_FP16 if SCALED else _DECODE_FP16
    else:
        asm: tl.constexpr = _DECODE_SCALED_BF16 if SCALED else _DECODE_BF16
    words = words.to(tl.uint32, bitcast=True)
    if SCALED:
        scale_pairs = _pairs(scale, dtype)
    else:  # (a constant: nothing computed for the operand the unscaled decode does not read)
        scale_pairs = tl.full(words.shape, one, tl.uint32)
    return tl.inline_asm_elementwise(
        asm, _CONSTRAINTS,
        [words, _pairs(-(base + zero), dtype), tl.full(words.shape, magic, tl.uint32),
         tl.full(words.shape, one, tl.uint32), scale_pairs],
        dtype=(dtype.value,) * 8, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _decoded_words(words, zero, scale, SCALED: tl.constexpr, X_FP16: tl.constexpr, EMULATE: tl.constexpr):
    """[R, C] int32 words, zero and scale [1, C] float32 -> [R, C, 8]: each word's codes minus the zero point
    (SCALED: times the scale, rounded to 16 bits) in K order, as x's 16-bit float (EMULATE: float32), the 8 in
    one thread's registers (tl.join keeps its new dimension within a thread)."""
    if EMULATE:
        d0 = _emulated_code(words, zero, scale, 0, SCALED, X_FP16)
        d1 = _emulated_code(words, zero, scale, 1, SCALED, X_FP16)
        d2 = _emulated_code(words, zero, scale, 2, SCALED, X_FP16)
        d3 = _emulated_code(words, zero, scale, 3, SCALED, X_FP16)
        d4 = _emulated_code(words, zero, scale, 4, SCALED, X_FP16)
        d5 = _emulated_code(words, zero, scale, 5, SCALED, X_FP16)
        d6 = _emulated_code(words, zero, scale, 6, SCALED, X_FP16)
        d7 = _emulated_code(words, zero, scale, 7, SCALED, X_FP16)
    else:  # -(base + z), base 128 (bf16) or 1024 (fp16): exact for integer z, as is (base + c) - (base + z)
        d0, d1, d2, d3, d4, d5, d6, d7 = _decode_asm(words, zero, scale, SCALED, X_FP16)
    even = tl.join(tl.join(d0, d4), tl.join(d2, d6))  # [R, C, 2, 2]: position 4a + 2b
    odd = tl.join(tl.join(d1, d5), tl.join(d3, d7))  # position 4a + 2b + 1
    return tl.reshape(tl.join(even, odd), (words.shape[0], words.shape[1], 8))


@triton.jit
def _w4_skinny_gemm_kernel(
    x_ptr,  # [M, K] bf16 / fp16
    qweight_ptr,  # [K / 8, N] int32
    scales_ptr,  # [G, N] fp16
    zeros_ptr,  # [G, N] fp16 (values)
    out_ptr,  # [M, N] in x's dtype
    partials_ptr,  # [SPLIT_K, M, N] float32 (SPLIT_K > 1)
    counters_ptr,  # [tiles] int32, zero between launches
    M,
    N,
    K,
    k_per_split,  # K rows per split, whole tiles
    stride_xm,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_om,
    X_FP16: tl.constexpr,  # x is fp16 (else bf16)
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP_SIZE (a tile lies in one group), or SCALED: a multiple of it
    SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: the words loaded unmasked (16-byte copies)
    SCALED: tl.constexpr,  # the scale applied to the decoded tile (rounded to 16 bits), not to its sums
    EMULATE: tl.constexpr,  # the Triton interpreter: the dot in float32 (its 16-bit dots and casts are unreliable)
):
    WORD_ROWS: tl.constexpr = BLOCK_K // 8
    TILE_GROUPS: tl.constexpr = BLOCK_K > GROUP_SIZE
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    tile = pid_m * tl.num_programs(0) + pid_n  # its split-K counter
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, WORD_ROWS)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    word_ptrs = qweight_ptr + offs_w[:, None] * stride_qk + offs_n[None, :]  # [WORD_ROWS, BLOCK_N] at K = 0
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M]: x^T at K = 0
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T's tile
    # The group's scales and zero points are read one tile ahead (Triton pipelines the words and x^T, whose
    # tiles feed the dot, not these): the loop never waits on a load it issued in the same iteration.
    scale_next = tl.load(scales_ptr + (k_start // GROUP_SIZE) * stride_sg + offs_n, mask=mask_n, other=0.0)
    zero_next = tl.load(zeros_ptr + (k_start // GROUP_SIZE) * stride_zg + offs_n, mask=mask_n, other=0.0)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_N:
            words = tl.load(word_ptrs + (k0 // 8) * stride_qk)
        else:
            words = tl.load(word_ptrs + (k0 // 8) * stride_qk, mask=mask_n[None, :], other=0)
        scale = scale_next.to(tl.float32)
        zero = zero_next.to(tl.float32)
        if not TILE_GROUPS:
            g_next = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K) // GROUP_SIZE  # the last tile re-reads its own
            scale_next = tl.load(scales_ptr + g_next * stride_sg + offs_n, mask=mask_n, other=0.0)
            zero_next = tl.load(zeros_ptr + g_next * stride_zg + offs_n, mask=mask_n, other=0.0)
        # [WORD_ROWS, BLOCK_N, 8]: c - z (SCALED: (c - z) s in 16 bits), then [BLOCK_N, BLOCK_K] in x_ptrs' K order
        if TILE_GROUPS:  # a tile over several groups (SCALED): each word row's own scales and zero points
            rows = ((k0 + offs_w * 8) // GROUP_SIZE)[:, None]  # [WORD_ROWS, 1]
            scale_rows = tl.load(
                scales_ptr + rows * stride_sg + offs_n[None, :], mask=mask_n[None, :], other=0.0
            )
            zero_rows = tl.load(
                zeros_ptr + rows * stride_zg + offs_n[None, :], mask=mask_n[None, :], other=0.0
            )
            w = _decoded_words(
                words, zero_rows.to(tl.float32), scale_rows.to(tl.float32), SCALED, X_FP16, EMULATE
            )
        else:
            w = _decoded_words(words, zero[None, :], scale[None, :], SCALED, X_FP16, EMULATE)
        w = tl.reshape(tl.permute(w, (1, 0, 2)), (BLOCK_N, BLOCK_K))
        xt = tl.load(x_ptrs + k0, mask=mask_m[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        if EMULATE:
            xt = xt.to(tl.float32)
        if SCALED:  # the dot accumulates: Triton keeps it in flight while the next tile decodes
            acc = tl.dot(w, xt, acc, input_precision="ieee" if EMULATE else None)
        else:  # [BLOCK_N, BLOCK_M] float32: sum_k (c - z) x, every product exact, scaled per group
            acc += tl.dot(w, xt, input_precision="ieee" if EMULATE else None) * scale[:, None]
    store_swapped_tile(acc, out_ptr, partials_ptr, counters_ptr, tile, offs_m, offs_n, M, N, stride_om, pid_k,
                       SPLIT_K)  # fmt: skip


def w4_skinny_gemm(
    x: torch.Tensor,  # [M, K] bfloat16 / float16, 1 <= M <= MAX_ROWS
    qweight: torch.Tensor,  # [K / 8, N] int32
    scales: torch.Tensor,  # [G, N] fp16
    zeros: torch.Tensor,  # [G, N] fp16, integers in [0, 63] (subtracted exactly in 16 bits; the engine checks at load)
    group_size: int,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    max_registers: int | None = None,
    scaled: bool = False,
    block_m: int = 16,
) -> torch.Tensor:  # [M, N] in x.dtype
    """y = x w for 4-bit codes, w[k, n] = (code - zero) * scale, in one launch; block_k divides group_size
    (at least 16; scaled, also a multiple of group_size: a tile over several groups); split_k > 1 splits K
    over that many programs per block_n columns (whole tiles each);
    max_registers: ptxas's cap a thread (more programs resident an SM; a sweep knob); scaled: each decoded
    weight multiplied by its scale and rounded to x's 16-bit type before the MMA (as the W4A16 GEMM does),
    so the dot accumulates across tiles, instead of the exact (c - z) tile and the scale on its sums; block_m:
    rows of x a program multiplies (16-128; each row tile reads the weights again, through L2)."""
    M, K = x.shape
    N = scales.shape[1]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"w4_skinny_gemm: x must be bfloat16 or float16; got {x.dtype}")
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"w4_skinny_gemm takes 1 to {MAX_ROWS} rows of x; got {M}")
    check_layout(qweight, scales, zeros, K, 4, group_size)
    if block_k % 16 or group_size % block_k and not (scaled and block_k % group_size == 0):
        raise ValueError(
            f"block_k {block_k} must divide group_size {group_size} (or, scaled, be a multiple of it) and be a "
            "multiple of 16"
        )
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1:
        raise ValueError(
            "w4_skinny_gemm: qweight, scales and zeros must be contiguous along their last dimension"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    k_per_split, split_k = k_splits(K, split_k, block_k)  # no empty split
    if block_m not in (16, 32, 64, 128):
        raise ValueError(f"w4_skinny_gemm: block_m is 16, 32, 64 or 128; got {block_m}")
    tiles_n, tiles_m = triton.cdiv(N, block_n), triton.cdiv(M, block_m)
    if split_k > 1 and tiles_n * tiles_m > MAX_TILES:
        raise ValueError(
            f"w4_skinny_gemm: {tiles_n * tiles_m} tiles exceed the split-K workspace ({MAX_TILES})"
        )
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    partials = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if split_k > 1 else out
    options = {} if max_registers is None or x.device.type != "cuda" else {"maxnreg": max_registers}
    _w4_skinny_gemm_kernel[(tiles_n, split_k, tiles_m)](
        x, qweight, scales, zeros, out, partials, split_counters(x.device), M, N, K, k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        X_FP16=x.dtype == torch.float16, GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT_K=split_k, EVEN_N=N % block_n == 0, SCALED=scaled, EMULATE=x.device.type != "cuda", num_warps=num_warps, num_stages=num_stages, **options,
    )  # fmt: skip
    return out
