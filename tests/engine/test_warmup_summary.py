"""The CUDA-graph warm-up line names the slowest warm-ups and sums the rest, so a GPU log tells
first-use cost (a few slow forwards) from the per-size cost every captured size pays."""

from __future__ import annotations

from engine.worker.warmup_summary import warmup_summary


def test_slowest_named_and_the_rest_summed() -> None:
    seconds = {"decode 1024": 1.2, "decode 1016": 0.4, "decode 8": 0.02, "decode 1": 0.3, "mixed 16": 0.03}
    assert warmup_summary(seconds) == (
        "slowest: decode 1024 1.20s, decode 1016 0.40s, decode 1 0.30s; "
        "the other 2: median 0.025s, 0.05s in all; 1.95s in all"
    )


def test_fewer_than_the_slowest_count_has_no_rest() -> None:
    assert (
        warmup_summary({"decode 1": 0.5, "mixed 16": 0.25})
        == "slowest: decode 1 0.50s, mixed 16 0.25s; 0.75s in all"
    )
    assert warmup_summary({}) == "none"


def test_median_of_an_odd_rest() -> None:
    seconds = {"decode 64": 0.9, "decode 1": 0.01, "decode 2": 0.04, "decode 4": 0.02}
    assert warmup_summary(seconds, slowest=1) == (
        "slowest: decode 64 0.90s; the other 3: median 0.020s, 0.07s in all; 0.97s in all"
    )
