"""loadtest/ab_table.py: a device call's A/B step reports side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import ab_table


def _write(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report))


def _l1(path: Path, b1: float, b8: float) -> None:
    _write(
        path, {"benchmark": "L1", "results": {"batch_1": {"itl_p50_ms": b1}, "batch_8": {"itl_p50_ms": b8}}}
    )


def _blocks(text: str) -> dict[str, list[str]]:
    """switch -> its figure lines, whitespace collapsed."""
    blocks: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("  "):
            blocks[current].append(" ".join(line.split()))
        else:
            current = line.split()[0]
            blocks[current] = []
    return blocks


def test_pairs_runs_and_reports_the_change(tmp_path: Path) -> None:
    _l1(tmp_path / "fda0a.json", 4.40, 4.60)
    _l1(tmp_path / "fda1a.json", 4.30, 4.61)
    _l1(tmp_path / "fda0b.json", 4.42, 4.62)
    _l1(tmp_path / "fda1b.json", 4.31, 4.60)
    _l1(tmp_path / "abold1.json", 4.0, 4.0)
    _l1(tmp_path / "abnew1.json", 5.0, 4.0)
    _write(tmp_path / "q1p0a.json", {"benchmark": "Q", "ratios": {"Q1_gptq_w4a16_itl_vs_bf16": 0.57}})
    _write(tmp_path / "q1p1a.json", {"benchmark": "Q", "ratios": {"Q1_gptq_w4a16_itl_vs_bf16": 0.50}})
    _write(tmp_path / "t1k0a.json", {"benchmark": "T1", "results": {"output_tok_s": 20000.0}})
    _write(tmp_path / "t1k1a.json", {"benchmark": "T1", "results": {"output_tok_s": 21000.0}})
    for name, b1, by_size in (
        ("grs0a", 5.03, {"1": 5.03, "256": 9.5}),
        ("grs1a", 5.12, {"1": 5.12, "256": None}),
    ):
        k1 = {
            "benchmark": "K1",
            "results": {"batch1": {"graph_replay_ms": b1, "graph_replay_ms_by_size": by_size}},
        }
        _write(tmp_path / f"{name}.json", k1)
    _write(tmp_path / "u1.json", {"benchmark": "U1", "results": {}})  # not an A/B step
    (tmp_path / "l1p0a.json").write_text("{not json")  # a step that died mid-write
    table = ab_table.collect(tmp_path)
    assert set(table) == {"fda", "ab", "q1p", "t1k", "grs"}
    assert table["grs"]["0"]["a"] == {
        "graph_replay_ms": 5.03,
        "graph    1 replay_ms": 5.03,
        "graph  256 replay_ms": 9.5,
    }
    assert table["grs"]["1"]["a"] == {"graph_replay_ms": 5.12, "graph    1 replay_ms": 5.12}  # no 256 graph
    assert table["fda"]["1"]["b"] == {"batch_1 itl_p50_ms": 4.31, "batch_8 itl_p50_ms": 4.60}
    blocks = _blocks(ab_table.render(table))
    assert blocks["fda"] == [
        "batch_1 itl_p50_ms 4.4 4.42 | 4.3 4.31 medians 4.41 -> 4.305 (-2.38%)",
        "batch_8 itl_p50_ms 4.6 4.62 | 4.61 4.6 medians 4.61 -> 4.605 (-0.11%) runs disagree",  # +0.01, -0.02
    ]
    assert blocks["ab"][0] == "batch_1 itl_p50_ms 4 | 5 medians 4 -> 5 (+25.00%)"
    assert blocks["t1k"] == ["output_tok_s 2e+04 | 2.1e+04 medians 2e+04 -> 2.1e+04 (+5.00%)"]
    assert blocks["q1p"] == ["Q1_gptq_w4a16_itl_vs_bf16 0.57 | 0.5 medians 0.57 -> 0.5 (-12.28%)"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ab_table.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "no A/B step reports here"
    assert ab_table.main([str(tmp_path / "missing")]) == 2
    assert "usage: python loadtest/ab_table.py DIR" in capsys.readouterr().err
