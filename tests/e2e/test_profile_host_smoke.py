"""loadtest/profile_host.py end to end on the tiny llama (CPU): a profiled beam search and n-sampling run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import profile_host


@pytest.mark.parametrize("workload", ["beam", "n"])
def test_profile_host_lists_where_the_host_time_goes(
    tiny_llama_dir: Path, tmp_path: Path, workload: str
) -> None:
    out = tmp_path / "h.json"
    argv = ["--model", str(tiny_llama_dir), "--device", "cpu", "--workload", workload, "--num-prompts", "2"]
    argv += ["--input-len", "8", "--output-len", "4", "--width", "2", "--top", "10", "--out", str(out)]
    assert profile_host.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["status"] == "ok" and not data["errors"]
    res = data["results"]
    assert res["step_loop"]["steps"] >= 4  # one forward pass per output token at least
    for key in ("by_own_time", "by_cumulative_time"):
        rows = res[key]
        assert len(rows) == 10 and all(r["calls"] > 0 for r in rows)
    names = {r["function"] for r in res["by_cumulative_time"]}
    entry = "beam_search" if workload == "beam" else "generate"
    assert any(f"({entry})" in n for n in names), names
