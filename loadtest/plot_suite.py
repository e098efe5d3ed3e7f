"""The suite's picture: one PNG beside its JSON reports.

    python loadtest/plot_suite.py OUT_DIR [--out OUT_DIR/suite.png]

Top row: each benchmark's throughput against each peer of the same call (T1, T2: output tok/s against
transformers generate() and, when it ran, its continuous batching; L1: tok/s at batch 1 and 8; P1: output
tok/s with the prefix cache; S1: serving at rate inf against the offline run), each bar labelled with its
value and weir's ratio. Bottom row: S1's TTFT and inter-token latency distributions at each request rate,
as CDFs: the whole distribution where the JSON has it (`*_quantiles_ms`, since the bench CLI), else the
p50/p90/p99 points. Needs matplotlib (`pip install 'weir[bench]'`); run_gpu_suite.sh calls this last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.summary import _dig  # noqa: E402

# (benchmark, panel title, weir's figure, [(peer label, path in the report), ...]); paths are dotted,
# 'a|b' takes the first present. Reports before `peers` existed keep generate() under `peer`.
PANELS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "T1",
        "T1 output tok/s (Qwen3-0.6B)",
        "results.output_tok_s",
        (("generate()", "peers.hf.output_tok_s|peer.output_tok_s"), ("HF CB", "peers.hf-cb.output_tok_s")),
    ),
    (
        "T2",
        "T2 output tok/s (Llama-3-8B)",
        "results.output_tok_s",
        (("generate()", "peers.hf.output_tok_s|peer.output_tok_s"), ("HF CB", "peers.hf-cb.output_tok_s")),
    ),
    ("L1", "L1 tok/s, batch 1", "results.batch_1.tok_s", (("generate()", "peer.batch_1.tok_s"),)),
    ("L1", "L1 tok/s, batch 8", "results.batch_8.tok_s", (("generate()", "peer.batch_8.tok_s"),)),
    (
        "P1",
        "P1 output tok/s (prefix cache on)",
        "results.on.output_tok_s",
        (("generate()", "peer.output_tok_s"),),
    ),
    (
        "S1",
        "S1 output tok/s, rate inf",
        "results.rate_inf.output_tok_s",
        (("offline (T2)", "results.offline_output_tok_s"),),
    ),
)
COLORS = {"weir": "#1f77b4", "generate()": "#ff7f0e", "HF CB": "#2ca02c", "offline (T2)": "#7f7f7f"}


def load_reports(directory: Path) -> dict[str, dict[str, Any]]:
    reports: dict[str, dict[str, Any]] = {}
    for f in sorted(directory.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("benchmark"), str) and "results" in data:
            reports[data["benchmark"]] = data
    return reports


def bar_panels(reports: dict[str, dict[str, Any]]) -> list[tuple[str, list[tuple[str, float]]]]:
    """(title, [(label, value), ...]) for every panel whose report and weir figure exist."""
    panels = []
    for bench, title, ours_path, peers in PANELS:
        data = reports.get(bench)
        ours = _dig(data, ours_path) if data else None
        if not isinstance(ours, int | float):
            continue
        bars = [("weir", float(ours))]
        for label, path in peers:
            value = _dig(data, path)
            if isinstance(value, int | float) and value > 0:
                bars.append((label, float(value)))
        panels.append((title, bars))
    return panels


def cdf_points(result: dict[str, Any], metric: str) -> tuple[list[float], list[float], bool] | None:
    """(ms values, cumulative fractions, whole distribution?) of S1's `metric` (ttft | itl) at one rate."""
    quantiles = result.get(f"{metric}_quantiles_ms")
    if quantiles:
        n = len(quantiles) - 1
        return list(quantiles), [i / n for i in range(n + 1)], True
    points = [(result.get(f"{metric}_p{q}_ms"), q / 100) for q in (50, 90, 99)]
    points = [(x, y) for x, y in points if isinstance(x, int | float) and x > 0]
    if not points:
        return None
    return [x for x, _ in points], [y for _, y in points], False


def rate_results(s1: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """S1's per-rate results, rate inf first, then finite rates in increasing order."""
    rates = [
        (k, v) for k, v in (s1.get("results") or {}).items() if k.startswith("rate_") and isinstance(v, dict)
    ]

    def key(item: tuple[str, dict[str, Any]]) -> float:
        rate = item[1].get("request_rate")
        return -1.0 if rate == "inf" else float(rate or 0)

    return sorted(rates, key=key)


def plot(directory: Path, out: Path) -> list[str]:
    """Write the PNG; returns the titles of the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = load_reports(directory)
    panels = bar_panels(reports)
    s1 = reports.get("S1")
    rates = rate_results(s1) if s1 else []
    if not panels and not rates:
        raise SystemExit(f"no benchmark reports with results in {directory}")
    cols = max(len(panels), 2)
    fig = plt.figure(figsize=(max(3.4 * cols, 8.0), 8.2 if rates else 4.2))
    grid = fig.add_gridspec(2 if rates else 1, cols)
    drawn: list[str] = []
    for i, (title, bars) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        labels = [b[0] for b in bars]
        values = [b[1] for b in bars]
        ax.bar(labels, values, color=[COLORS.get(lbl, "#999999") for lbl in labels])
        for j, v in enumerate(values):
            text = f"{v:,.0f}" if v >= 100 else f"{v:,.2f}"
            if j:
                text += f"\nweir {values[0] / v:.2g}x" if v else ""
            ax.annotate(text, (j, v), ha="center", va="bottom", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, max(values) * 1.3)
        ax.tick_params(axis="x", labelsize=7, rotation=15)
        ax.tick_params(axis="y", labelsize=7)
        drawn.append(title)
    if rates:
        half = cols // 2
        for k, (metric, label) in enumerate((("ttft", "S1 TTFT"), ("itl", "S1 inter-token latency"))):
            ax = fig.add_subplot(grid[1, k * half : (k + 1) * half if k == 0 else cols])
            for rate_key, res in rates:
                pts = cdf_points(res, metric)
                if pts is None:
                    continue
                xs, ys, whole = pts
                name = rate_key.replace("rate_", "rate ")
                if whole:
                    ax.plot(xs, ys, label=name)
                else:
                    ax.plot(xs, ys, "o--", label=f"{name} (p50/p90/p99)")
            ax.set_xscale("log")
            ax.set_xlabel("ms (log)", fontsize=8)
            ax.set_ylabel(
                "fraction of requests" if metric == "ttft" else "fraction of token gaps", fontsize=8
            )
            ax.set_ylim(0, 1.02)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            ax.set_title(f"{label}, CDF per request rate", fontsize=9)
            drawn.append(label)
    any_report = next(iter(reports.values()))
    commit = (any_report.get("commit") or "?")[:9]
    fig.suptitle(
        f"weir suite: {any_report.get('card', '?')}, commit {commit}, {any_report.get('date', '')}",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", type=Path, help="the suite's output folder (its *.json reports)")
    p.add_argument("--out", type=Path, default=None, help="the PNG (default: DIRECTORY/suite.png)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_suite: matplotlib is not installed (pip install 'weir[bench]'); no PNG", file=sys.stderr)
        return 2
    out = args.out or args.directory / "suite.png"
    drawn = plot(args.directory, out)
    print(f"wrote {out} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
