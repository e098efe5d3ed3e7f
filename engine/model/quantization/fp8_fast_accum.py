"""Where cuBLASLt's fast FP8 accumulation pays, by layer shape and rows.

`WEIR_FP8_FAST_ACCUM` (on) runs the W8A8 GEMMs with `use_fast_accum`, which took Q3 (T2 with FP8
weights) from 1.375x to 1.482x bf16's on an H100. But cuBLASLt picks other algorithms with it, and some
are slower: loadtest/probe_fp8_gemm.py on an H100 at 9ae29e1 timed Llama-3-8B's qkv at 256 rows in
0.0323 ms with it against 0.0195 without, gate_up at 8,192 rows 1.764 against 1.661, down at 2,048
0.189 against 0.179, while most other shapes and row counts gain 2-15%. So a table says, per
(in_features, out_features), at which measured row counts fast accumulation is slower; a GEMM of other
rows follows the nearest measured count (in log2). Shapes without an entry keep fast accumulation.

The table is the probe's own output (`probe_fp8_gemm.py --fast-accum-table-out PATH`, the card it ran
on); WEIR_FP8_FAST_ACCUM_TABLE=PATH makes the engine read that file instead of the built-in one.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

# (in_features, out_features) -> {rows measured: fast accumulation as fast or faster}
FastAccumTable = dict[tuple[int, int], dict[int, bool]]

BUILT_IN: FastAccumTable = {}

TABLE_ENV = "WEIR_FP8_FAST_ACCUM_TABLE"


def parse_table(data: dict) -> FastAccumTable:
    """The probe's JSON ({"INxOUT": {"ROWS": bool}}) as a table; a malformed entry is a ValueError
    naming it (the engine refuses to start on it rather than guess)."""
    table: FastAccumTable = {}
    for shape, rows in data.items():
        try:
            in_f, out_f = (int(v) for v in shape.split("x"))
            table[(in_f, out_f)] = {int(r): bool(fast) for r, fast in rows.items()}
        except (ValueError, AttributeError) as e:
            raise ValueError(
                f"{TABLE_ENV}: entry {shape!r}: expected 'INxOUT': {{'ROWS': true|false}}"
            ) from e
    return table


@functools.cache
def active_table() -> FastAccumTable:
    """The table the engine uses: the file WEIR_FP8_FAST_ACCUM_TABLE names, else the built-in one."""
    path = os.environ.get(TABLE_ENV, "")
    if not path:
        return BUILT_IN
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{TABLE_ENV}={path}: cannot read a JSON table: {e}") from e
    return parse_table(data)


def fast_accum_pays(
    in_features: int, out_features: int, rows: int, table: FastAccumTable | None = None
) -> bool:
    """Whether a GEMM of this shape and rows runs fast accumulation: the nearest measured row count's
    verdict (ties to the larger count), True for shapes the table lacks."""
    entry = (active_table() if table is None else table).get((in_features, out_features))
    if not entry:
        return True
    nearest = min(entry, key=lambda r: (abs(math.log2(max(rows, 1)) - math.log2(r)), -r))
    return entry[nearest]
