"""Reading an fp8 KV tile as float16 four bytes at a time (paged attention's fp8 path, WEIR_FP8_KV_WIDEN=1).

Why: Triton widens an fp8 tile that feeds a dot late. It stages the bytes in shared memory and reads them
back one byte per element in the dot's operand layout (LDS.U8), converts pairs with cvt.f16x2, and for
bfloat16 queries converts every element again, fp16 -> bf16. In paged attention's unmasked loop on sm_90
that is 702 instructions per 64 x 128 K + V tile against 329 for a bfloat16 tile of twice the bytes
(SASS compiled on CPU with the launch's 16-byte specializations): at large decode batches an fp8 cache
read as fast as its bytes allow would need twice the bf16 tile rate, and instead costs more per tile.

How: the tile is loaded as 32-bit words ([rows, HEAD_DIM / 4] int32, the 16-byte cp.async path stays),
each word widened in registers to four float16 (two cvt.rn.f16x2.{e4m3,e5m2}x2) before the dot, so
Triton stages a float16 tile for ldmatrix as it does for a bfloat16 cache: 341 instructions a tile.

Numerics: every e4m3 and e5m2 value is exact in float16 (wider exponent and mantissa), so the widened
tile holds the cache's values exactly; the caller runs its dots in float16 (see paged_attention).

The PTX conversion needs sm_89+ (Ada, Hopper, Blackwell). Elsewhere (older GPUs' e5m2 caches, and the
Triton interpreter, which cannot run inline PTX) HW_CVT is off and each byte is widened by bit arithmetic
to the same values (the interpreter's own fp8 casts are not exact: e4m3's NaN reads as 480, e5m2's
subnormals as 0), so CPU tests check the word loads, the byte order and every value.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ops.triton.head_dim import head_lanes, head_rows_mask, pad

E4M3: tl.constexpr = tl.constexpr(1)  # FORMAT codes (paged attention's KV_WIDEN)
E5M2: tl.constexpr = tl.constexpr(2)

# One word of four fp8 bytes -> four float16, byte j of the word -> output j (little endian: byte 0 is the
# cache's first element). cvt.rn.f16x2.<fmt>x2 widens a 16-bit pair, its low byte into the low half.
_WIDEN_PTX = (
    "{ .reg .b16 lo, hi; .reg .b32 p, q; mov.b32 {lo, hi}, $4; "
    "cvt.rn.f16x2.FMTx2 p, lo; cvt.rn.f16x2.FMTx2 q, hi; mov.b32 {$0, $1}, p; mov.b32 {$2, $3}, q; }"
)
_WIDEN_E4M3: tl.constexpr = tl.constexpr(_WIDEN_PTX.replace("FMT", "e4m3"))
_WIDEN_E5M2: tl.constexpr = tl.constexpr(_WIDEN_PTX.replace("FMT", "e5m2"))


@triton.jit
def _byte_to_f16(words, j: tl.constexpr, FORMAT: tl.constexpr):
    """Byte j of each int32 word as float16, exactly (NaN, infinities and subnormals included), by bit
    arithmetic: e5m2 is float16's top byte; e4m3's sign and 7 low bits shifted into float16's places read
    as its value * 2**-8 (the exponent biases differ by 8), exact in float16, then scaled back."""
    byte = ((words >> (8 * j)) & 0xFF).to(tl.uint16)
    if FORMAT == E4M3:
        bits = ((byte & 0x80) << 8) | ((byte & 0x7F) << 7)
        value = bits.to(tl.float16, bitcast=True) * 256.0
        return tl.where((byte & 0x7F) == 0x7F, float("nan"), value).to(tl.float16)
    else:
        return (byte << 8).to(tl.float16, bitcast=True)


@triton.jit
def widen_words(words, FORMAT: tl.constexpr, HW_CVT: tl.constexpr):
    """[R, C] int32 words of four fp8 bytes -> [R, 4 * C] float16; element 4c + j is byte j of word c."""
    if HW_CVT:
        if FORMAT == E4M3:
            b0, b1, b2, b3 = tl.inline_asm_elementwise(
                _WIDEN_E4M3, "=h,=h,=h,=h,r", [words], dtype=(tl.float16,) * 4, is_pure=True, pack=1
            )
        else:
            b0, b1, b2, b3 = tl.inline_asm_elementwise(
                _WIDEN_E5M2, "=h,=h,=h,=h,r", [words], dtype=(tl.float16,) * 4, is_pure=True, pack=1
            )
    else:
        b0 = _byte_to_f16(words, 0, FORMAT)
        b1 = _byte_to_f16(words, 1, FORMAT)
        b2 = _byte_to_f16(words, 2, FORMAT)
        b3 = _byte_to_f16(words, 3, FORMAT)
    # [R, C, 2, 2]: [r, c, i, j] = byte 2i + j of word c, so the row-major reshape puts it at 4c + 2i + j
    quads = tl.join(tl.join(b0, b2), tl.join(b1, b3))
    return tl.reshape(quads, (words.shape[0], words.shape[1] * 4))


@triton.jit
def load_f16_rows(
    rows,  # [R] pointers to fp8 rows of HEAD_DIM bytes, 4-byte aligned
    valid,  # [R] rows to read (MASKED); zeros elsewhere
    HEAD_DIM: tl.constexpr,
    FORMAT: tl.constexpr,
    HW_CVT: tl.constexpr,
    MASKED: tl.constexpr,
):
    """[R, pad(HEAD_DIM)] float16: the fp8 rows' values, read as HEAD_DIM / 4 words a row (a padded head,
    ops/triton/head_dim.py: the words past them read as 0, which widen to +0.0)."""
    HEAD_WORDS: tl.constexpr = HEAD_DIM // 4
    offs_w = tl.arange(0, pad(HEAD_WORDS))
    word_ptrs = rows.to(tl.pointer_type(tl.int32))[:, None] + offs_w[None, :]  # [R, pad(HEAD_DIM) / 4]
    if MASKED:
        words = tl.load(word_ptrs, mask=head_rows_mask(valid, offs_w, HEAD_WORDS), other=0)
    elif pad(HEAD_WORDS) != HEAD_WORDS:
        words = tl.load(word_ptrs, mask=head_lanes(offs_w, HEAD_WORDS), other=0)
    else:
        words = tl.load(word_ptrs)
    return widen_words(words, FORMAT, HW_CVT)
