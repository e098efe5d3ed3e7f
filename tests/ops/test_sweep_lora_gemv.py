"""loadtest/sweep_lora_gemv.py's CPU smoke mode (tiny layers under TRITON_INTERPRET=1): every variant
checked against the reference, the plan's row found, the best printed as a `_LORA_LAUNCHES` line; the
budget cut-off; and the grid at the real layers, where each of today's plans must be one variant."""

from __future__ import annotations

# isort: off
# First: it sets TRITON_INTERPRET before anything below can import triton.
from tests.ops.triton_interpreter import in_process, only_in_subprocess, rerun_in_fresh_process

# isort: on

import ast
import json
from pathlib import Path

import pytest


@only_in_subprocess
def test_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


def test_the_grid_holds_each_of_todays_plans_once() -> None:
    from engine.model.quantization.float_gemv import plan_float_gemv
    from loadtest.sweep_lora_gemv import CHUNKS, LAYERS, launch_of, variants

    grid = variants(CHUNKS)
    assert len(grid) == 18  # 2 x 3 two-launch variants, 4 x 3 fused ones
    assert not any(v["reduce_t"] and not v["fuse_shrink"] for v in grid)
    for _, k, sizes in LAYERS:
        plan = plan_float_gemv(k, sum(sizes), lora=True)
        today = {key: value for key, value in plan.items() if key != "fuse_shrink" or value}
        assert [launch_of(plan, v) for v in grid].count(today) == 1, plan


@in_process
def test_smoke_sweep_checks_every_variant_and_prints_the_best(tmp_path: Path) -> None:
    from loadtest.sweep_lora_gemv import main

    out = tmp_path / "sweep.json"
    assert main(["--smoke", "--layers", "qkv", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (layer,) = doc["layers"]
    assert doc["smoke"] is True and layer["layer"] == "qkv" and len(layer["variants"]) == 18
    assert all(r["ok"] and r["rel_err"] < 1e-5 and r["us"] > 0 for r in layer["variants"])
    (plan,) = [r for r in layer["variants"] if r["is_plan"]]
    assert plan["launch"] == {"block_n": 16, "block_k": 64, "split_k": 1} == layer["plan"]
    assert layer["plan_us"] == plan["us"] and layer["wrong"] == [] and layer["skipped"] == []
    assert layer["best"]["us"] == min(r["us"] for r in layer["variants"])
    (line,) = doc["entries"]
    key, launch = line.split("  # ")[0].strip().rstrip(",").split(": ", 1)
    assert ast.literal_eval(key) == (128, 64) and ast.literal_eval(launch) == layer["best"]["launch"]


@in_process
def test_smoke_sweep_stops_at_its_budget_and_precompiles(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from loadtest.sweep_lora_gemv import _precompile, main

    out = tmp_path / "sweep.json"
    # one compile process, past its deadline at once (a spawned process takes more than the 1 s floor)
    assert main(["--smoke", "--layers", "down", "--budget-s", "0", "--jobs", "1", "--out", str(out)]) == 0
    assert "[sweep-lora] precompile past its deadline: stopped" in capsys.readouterr().out
    (layer,) = json.loads(out.read_text())["layers"]
    assert len(layer["skipped"]) == 18 and layer["best"] is None and layer["plan_us"] is None
    assert json.loads(out.read_text())["entries"] == ["    # down (320, 48): no variant both right and timed"]
    axes = ((512,), (False,), (False,), (False, True))  # chunks, fuse_shrink, reduce_t, early_b
    assert _precompile((3, False, True, axes)) == "down two launches"
    with pytest.raises(SystemExit):
        main(["--smoke", "--layers", "qkv,lm_head"])


@in_process
def test_smoke_sweep_tries_other_tiles_beside_the_plans(tmp_path: Path) -> None:
    """--tiles adds (block_k, num_warps) variants of every option beside the plan's own tiles; each is
    checked like the rest, and a malformed pair is refused."""
    from loadtest.sweep_lora_gemv import main

    out = tmp_path / "sweep.json"
    assert (
        main(
            [
                "--smoke",
                "--layers",
                "o",
                "--fuse",
                "0",
                "--chunks",
                "512",
                "--tiles",
                "32x2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (layer,) = json.loads(out.read_text())["layers"]
    launches = [r["launch"] for r in layer["variants"]]
    assert len(launches) == 4  # (plan's tiles, 32x2) x early_b
    assert sum(launch.get("num_warps") == 2 and launch["block_k"] == 32 for launch in launches) == 2
    assert (
        all(r["ok"] for r in layer["variants"]) and [r["is_plan"] for r in layer["variants"]].count(True) == 1
    )
    with pytest.raises(SystemExit):
        main(["--smoke", "--layers", "o", "--tiles", "512by2"])
