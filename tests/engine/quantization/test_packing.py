"""The bit layouts, pinned with hand-made int32 words (facts from the reference implementations),
so the packers the other tests write checkpoints with cannot drift together with the unpackers."""

from __future__ import annotations

import torch

from engine.model.quantization.packing import AWQ_PACK_ORDER, pack_cols, pack_rows, unpack_cols, unpack_rows

# 0x76543210 as int32: nibble k (lowest first) holds k; 0xF0E1D2C3 has its sign bit set.
WORD = 0x76543210
SIGNED_WORD = 0xF0E1D2C3 - 2**32


def test_gptq_qweight_rows_lowest_nibble_first() -> None:
    # GPTQModel BaseQuantLinear.dequantize_weight: rows i*8+k come from (word >> 4k) & 0xF.
    packed = torch.tensor([[WORD, SIGNED_WORD]], dtype=torch.int32)  # [1, 2]
    codes = unpack_rows(packed, 4)  # [8, 2]
    assert codes[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert codes[:, 1].tolist() == [0x3, 0xC, 0x2, 0xD, 0x1, 0xE, 0x0, 0xF]
    assert torch.equal(pack_rows(codes, 4), packed)


def test_gptq_8bit_and_qzeros_columns() -> None:
    packed = torch.tensor([[WORD]], dtype=torch.int32)
    assert unpack_rows(packed, 8)[:, 0].tolist() == [0x10, 0x32, 0x54, 0x76]
    assert unpack_cols(packed, 4)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert torch.equal(pack_cols(unpack_cols(packed, 8), 8), packed)


def test_awq_interleaved_order() -> None:
    # AutoAWQ WQLinear_GEMM.from_linear: nibble k holds column [0, 2, 4, 6, 1, 3, 5, 7][k].
    packed = torch.tensor([[WORD]], dtype=torch.int32)
    assert unpack_cols(packed, 4, AWQ_PACK_ORDER)[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    columns = torch.tensor([[10, 11, 12, 13, 14, 15, 0, 1]])
    word = pack_cols(columns, 4, AWQ_PACK_ORDER).item() & 0xFFFFFFFF
    assert [(word >> (4 * k)) & 0xF for k in range(8)] == [10, 12, 14, 0, 11, 13, 15, 1]
