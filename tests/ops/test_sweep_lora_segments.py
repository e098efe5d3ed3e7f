"""loadtest/sweep_lora_segments.py's CPU smoke mode (tiny layers under TRITON_INTERPRET=1): every shrink and
expand variant checked against the reference, today's launch found in each grid, the best picked."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import json
from pathlib import Path


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def test_the_real_grids_hold_the_launches_before_and_today_once() -> None:
    """The launch every step took before segment_launch, and the rule's launch for A1's and A2's
    steps (the sweep's two steps, on as many slots as adapters), each once in the grids."""
    from engine.lora.segments import segment_piece
    from loadtest.sweep_lora_segments import (
        BEFORE,
        EXPAND_GRID,
        SHRINK_GRID,
        STEPS,
        TOKENS,
        grid,
        todays_launch,
    )

    shrinks, expands = grid(SHRINK_GRID), grid(EXPAND_GRID)
    assert len(shrinks) == 9 and len(expands) == 18
    assert shrinks.count(BEFORE["shrink"]) == 1 and expands.count(BEFORE["expand"]) == 1
    for _, slots in STEPS:
        today = todays_launch(TOKENS, segment_piece(TOKENS), slots)
        assert shrinks.count(today["shrink"]) == 1 and expands.count(today["expand"]) == 1


@in_process
def test_smoke_sweep_checks_every_variant_and_picks_the_best(tmp_path: Path) -> None:
    from loadtest.sweep_lora_segments import main

    out = tmp_path / "sweep.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["smoke"] is True and [r["layer"] for r in doc["results"]] == ["qkv", "down"]
    for r in doc["results"]:
        assert r["segments"] == 6  # six adapters of four tokens: a segment each
        for kind, count in (("shrink", 4), ("expand", 4)):
            variants = r[kind]["variants"]
            assert len(variants) == count and all(v["ok"] and v["us"] > 0 for v in variants), variants
            assert [v["is_today"] for v in variants].count(True) == 1 and r[kind]["wrong"] == []
            assert r[kind]["best"]["us"] == min(v["us"] for v in variants)
