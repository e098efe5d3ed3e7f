"""One log line on where the CUDA-graph warm-up forwards went: the slowest few by name, and the rest.

Each captured size gets one eager warm-up forward before its capture (engine/worker/cuda_graphs.py).
What they cost is of two kinds: first use (a Triton kernel compiled for a specialization not seen
before, a cuBLAS kernel loaded) lands in a few forwards; a forward's own GPU and launch time is paid by
every size. The line tells the two apart, so a GPU run shows whether fewer warm-ups would save
anything (only the second kind would shrink) before anyone removes one.
"""

from __future__ import annotations


def warmup_summary(seconds: dict[str, float], slowest: int = 3) -> str:
    """`seconds`: warm-up name -> seconds. E.g. "slowest: decode 1024 1.20s, decode 1 0.30s; the
    other 71: median 0.021s, 1.49s in all; 3.05s in all"."""
    if not seconds:
        return "none"
    ranked = sorted(seconds.items(), key=lambda item: item[1], reverse=True)
    top, rest = ranked[:slowest], [s for _, s in ranked[slowest:]]
    text = "slowest: " + ", ".join(f"{name} {s:.2f}s" for name, s in top)
    if rest:
        text += f"; the other {len(rest)}: median {_median(rest):.3f}s, {sum(rest):.2f}s in all"
    return f"{text}; {sum(seconds.values()):.2f}s in all"


def _median(values: list[float]) -> float:
    # Not statistics.median: that module (and what it imports) would join every start-up's imports.
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
