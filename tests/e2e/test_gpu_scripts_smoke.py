"""CPU smoke runs of two GPU scripts, so they do not rot between device calls: loadtest/bench_sampler.py
(the sampler's draw checked against its spec, kernel under the Triton interpreter) and
loadtest/trace_compiles.py (the engine built with the compile hooks and warm-up marks in place; on CPU
nothing compiles)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bench_sampler_cpu(tmp_path: Path) -> None:
    out = tmp_path / "sampler.json"
    _run(["loadtest/bench_sampler.py", "--device", "cpu", "--batch-sizes", "1,3", "--vocab-size", "3000",
          "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [r["rows"] for r in rows] == [1, 3]
    assert all(r["triton_equals_spec"] and r["greedy_equals_torch"] for r in rows), rows
    assert all(r["softmax_path_differs_rows"] == 0 for r in rows), rows


def test_trace_compiles_cpu(tmp_path: Path) -> None:
    out = tmp_path / "compiles.json"
    _run(["loadtest/trace_compiles.py", "--device", "cpu", "--shape", "tiny-llama3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["compiles"] == []  # the torch kernels on CPU: nothing for Triton to compile
    names = [name for _, name in report["marks"]]
    assert names[:2] == ["before graphs", "after graphs"] and names[2].startswith("first request"), names
