"""The A/B steps of one device call side by side: which setting won, by how much, in every run.

loadtest/device_call.sh runs a switch's settings alternately in one call (`fda0a fda1a fda0b fda1b`:
WEIR_FUSED_DECODE_ATTENTION 0 / 1, runs a and b; `l1p0a l1p1a ...`, `q1p0a q1p1a ...`, `pdl0a ...`,
`t1k0a t1k1a ...` (T1 with a bf16 / fp8 KV cache);
`abold1 abnew1 ...`: an older tree against this one), each writing `<step>.json`. Machines differ by up
to 4% and a call's runs drift, so a setting is judged within a call, run against run: this prints, per
switch and figure, each run's value for each setting, the medians, the change of the second setting
against the first, and whether every run agrees on the sign (the rule the README's A/B results use).

    python loadtest/ab_table.py OUT_DIR          # the files of one call (o/ of r.tgz)
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

# <switch><setting><run>.json: fda0a.json; abold1.json / abnew1.json (the setting a word, the run a digit)
_STEP = re.compile(
    r"^(?P<switch>[a-z0-9]*?[a-z])(?P<setting>[01])(?P<run>[a-z])$|^ab(?P<ab>old|new)(?P<abrun>\d+)$"
)


def figures(report: dict[str, Any]) -> dict[str, float]:
    """The figures a step's report gives: L1's ITL p50 (and roofline fraction) per batch, K1's decode graphs
    replayed alone (ms per replay, per size), T1 / T2's output tok/s, ratios (Q's; a peer's ratios are not among them: the A/B steps run without a peer)."""
    out: dict[str, float] = {}
    results = report.get("results") or {}
    if report.get("benchmark") == "L1":
        for key, value in results.items():
            if key.startswith("batch_") and isinstance(value, dict):
                for name in ("itl_p50_ms", "roofline_fraction"):
                    if isinstance(value.get(name), int | float):
                        out[f"{key} {name}"] = float(value[name])
    if report.get("benchmark") == "K1":  # the decode graphs replayed alone (grs0a grs1a ...)
        step = results.get("batch1") or {}
        if isinstance(step.get("graph_replay_ms"), int | float):
            out["graph_replay_ms"] = float(step["graph_replay_ms"])
        for size, ms in (step.get("graph_replay_ms_by_size") or {}).items():
            if isinstance(ms, int | float):
                out[f"graph {int(size):>4} replay_ms"] = float(ms)
    if report.get("benchmark") in ("T1", "T2") and isinstance(results.get("output_tok_s"), int | float):
        out["output_tok_s"] = float(results["output_tok_s"])
    for key, value in (report.get("ratios") or {}).items():
        if isinstance(value, int | float):
            out[key] = float(value)
    return out


def collect(directory: Path) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """switch -> setting -> run -> figures, from the step reports in `directory`."""
    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for path in sorted(directory.glob("*.json")):
        m = _STEP.match(path.stem)
        if not m:
            continue
        if m.group("ab"):
            switch, setting, run = "ab", "0" if m.group("ab") == "old" else "1", m.group("abrun")
        else:
            switch, setting, run = m.group("switch"), m.group("setting"), m.group("run")
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        values = figures(report)
        if values:
            table.setdefault(switch, {}).setdefault(setting, {})[run] = values
    return table


def render(table: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
    lines = []
    for switch, settings in sorted(table.items()):
        off, on = settings.get("0", {}), settings.get("1", {})
        names = sorted({n for runs in (off, on) for values in runs.values() for n in values})
        label = "old / new tree" if switch == "ab" else "setting 0 / 1"
        lines.append(f"{switch} ({label}; runs {', '.join(sorted(set(off) | set(on)))})")
        for name in names:
            a = [off[r][name] for r in sorted(off) if name in off[r]]
            b = [on[r][name] for r in sorted(on) if name in on[r]]
            if not a or not b:
                continue
            ma, mb = statistics.median(a), statistics.median(b)
            change = (mb - ma) / ma * 100 if ma else float("nan")
            paired = [(x, y) for x, y in zip(a, b, strict=False)]
            agree = len({(y > x) - (y < x) for x, y in paired}) == 1
            lines.append(
                f"  {name:28s} {' '.join(f'{x:.4g}' for x in a):>24s} | {' '.join(f'{y:.4g}' for y in b):<24s}"
                f" medians {ma:.4g} -> {mb:.4g} ({change:+.2f}%){'' if agree else '  runs disagree'}"
            )
    return "\n".join(lines) if lines else "no A/B step reports here"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python loadtest/ab_table.py DIR (a device call's output folder)", file=sys.stderr)
        return 2
    print(render(collect(Path(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
