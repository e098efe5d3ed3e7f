"""Bit packing of low-bit integer weights into int32 words, as GPTQ and AWQ checkpoints store them.

One int32 word holds `32 // bits` values; value k of a word sits at bits [k * bits, (k + 1) * bits).
- GPTQ packs along the rows of a [rows, cols] matrix: word (r, c) holds rows r*pf .. r*pf + pf-1 of
  column c, the first row in the lowest bits (qweight: rows are the input dim). Its qzeros pack along
  the columns the same way (word (g, c) holds columns c*pf ..).
- AWQ packs along the columns in an interleaved order: value k of a word (lowest bits first) holds
  column `AWQ_PACK_ORDER[k]` of the word's 8 columns (AutoAWQ, awq/modules/linear/gemm.py,
  WQLinear_GEMM.from_linear: order_map [0, 2, 4, 6, 1, 3, 5, 7]).

Unpacked values are unsigned, in [0, 2**bits). Words are int32 on disk; the arithmetic here runs in
int64 so the sign bit of the top value never leaks into a shift.
"""

from __future__ import annotations

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_factor(bits: int) -> int:
    if 32 % bits:
        raise ValueError(f"bits must divide 32; got {bits}")
    return 32 // bits


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, device=device, dtype=torch.int64)  # [pf]


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows / pf, cols] int32 -> [rows, cols] uint8 (GPTQ qweight)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [R, C]
    values = (words.unsqueeze(1) >> _shifts(bits, packed.device).view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1]).to(torch.uint8)  # [R * pf, C]


def unpack_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[rows, cols / pf] int32 -> [rows, cols] uint8 (GPTQ qzeros; AWQ qweight/qzeros with `order`)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [R, C]
    values = (words.unsqueeze(2) >> _shifts(bits, packed.device).view(1, 1, -1)) & ((1 << bits) - 1)
    if order is not None:  # values[..., k] is column order[k] of its word: put column j at j
        values = values[..., _inverse(order)]
    return values.reshape(packed.shape[0], -1).to(torch.uint8)  # [R, C * pf]


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] ints in [0, 2**bits) -> [rows / pf, cols] int32 (inverse of unpack_rows)."""
    pf = pack_factor(bits)
    v = values.to(torch.int64).reshape(-1, pf, values.shape[1])  # [R / pf, pf, C]
    words = (v << _shifts(bits, values.device).view(1, -1, 1)).sum(dim=1)
    return _to_int32(words)


def pack_cols(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[rows, cols] ints in [0, 2**bits) -> [rows, cols / pf] int32 (inverse of unpack_cols)."""
    pf = pack_factor(bits)
    v = values.to(torch.int64).reshape(values.shape[0], -1, pf)  # [R, C / pf, pf]
    if order is not None:
        v = v[..., list(order)]  # value k of a word holds column order[k]
    words = (v << _shifts(bits, values.device).view(1, 1, -1)).sum(dim=2)
    return _to_int32(words)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _inverse(order: tuple[int, ...]) -> list[int]:
    inverse = [0] * len(order)
    for position, column in enumerate(order):
        inverse[column] = position
    return inverse
