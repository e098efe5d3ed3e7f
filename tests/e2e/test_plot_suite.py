"""loadtest/plot_suite.py: the suite's PNG from its JSON reports (the committed H200 suite, and reports that
carry the whole S1 distributions and the continuous-batching peer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loadtest import plot_suite
from loadtest.common import REPO_ROOT

pytest.importorskip("matplotlib")
SUITE = REPO_ROOT / "loadtest" / "results" / "suite-h200-2026-12-02-d0c9b9a"


def assert_real_png(path: Path, min_bytes: int = 30_000) -> None:
    """A PNG of a figure, not an empty canvas: large, with ink on a few percent of it and in colour."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes
    pixels = mpimg.imread(path)[:, :, :3]  # [height, width, rgb] in 0..1
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800
    ink = (pixels < 0.9).any(axis=2).mean()
    assert 0.02 < ink < 0.6, ink
    assert (pixels.max(axis=2) - pixels.min(axis=2)).max() > 0.5  # coloured bars or lines, not greys only


def test_plot_from_the_committed_suite(tmp_path: Path) -> None:
    out = tmp_path / "suite.png"
    drawn = plot_suite.plot(SUITE, out)
    assert_real_png(out)
    assert drawn == [
        "T1 output tok/s (Qwen3-0.6B)",
        "T2 output tok/s (Llama-3-8B)",
        "L1 tok/s, batch 1",
        "L1 tok/s, batch 8",
        "P1 output tok/s (prefix cache on)",
        "S1 output tok/s, rate inf",
        "S1 TTFT",
        "S1 inter-token latency",
    ]
    reports = plot_suite.load_reports(SUITE)
    # These reports predate the quantiles: their CDFs are the p50/p90/p99 points.
    xs, ys, whole = plot_suite.cdf_points(reports["S1"]["results"]["rate_16"], "ttft")
    assert not whole and ys == [0.5, 0.9, 0.99] and xs == [35.712, 63.9035, 89.8927]
    assert [k for k, _ in plot_suite.rate_results(reports["S1"])] == ["rate_inf", "rate_16"]


def test_plot_with_both_peers_and_whole_distributions(tmp_path: Path) -> None:
    for name in ("t2.json", "s1.json"):
        shutil.copy(SUITE / name, tmp_path / name)
    t2 = json.loads((tmp_path / "t2.json").read_text())
    t2["peers"] = {"hf": t2["peer"], "hf-cb": {"output_tok_s": 2500.0}}
    (tmp_path / "t2.json").write_text(json.dumps(t2))
    s1 = json.loads((tmp_path / "s1.json").read_text())
    s1["results"]["rate_16"]["itl_quantiles_ms"] = [5.0 + i for i in range(101)]
    (tmp_path / "s1.json").write_text(json.dumps(s1))
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a report: ignored
    panels = dict(plot_suite.bar_panels(plot_suite.load_reports(tmp_path)))
    assert panels["T2 output tok/s (Llama-3-8B)"] == [
        ("weir", t2["results"]["output_tok_s"]),
        ("generate()", t2["peer"]["output_tok_s"]),
        ("HF CB", 2500.0),
    ]
    xs, ys, whole = plot_suite.cdf_points(s1["results"]["rate_16"], "itl")
    assert whole and xs[0] == 5.0 and ys[0] == 0.0 and ys[-1] == 1.0 and len(xs) == 101
    assert plot_suite.main([str(tmp_path)]) == 0
    assert_real_png(tmp_path / "suite.png", min_bytes=20_000)


def test_plot_needs_reports(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no benchmark reports"):
        plot_suite.plot(tmp_path, tmp_path / "x.png")
