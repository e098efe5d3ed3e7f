"""LoopHistogram exports exactly what prometheus_client's Histogram does for the same observations
(bucket edges included: a value equal to a bound counts in that bound's bucket)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.loop_histogram import LoopHistogram

BUCKETS = (0.01, 0.025, 0.05, 0.1, 1.0, 2.5)
VALUES = [0.0, 0.01, 0.0100001, 0.024, 0.05, 0.3, 1.0, 2.5, 2.6, 100.0, 0.049]


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_same_series_as_prometheus_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = LoopHistogram("weir:x_seconds", "doc", BUCKETS, ["m"])
    ours.register(fast)
    reference = Histogram("weir:x_seconds", "doc", ["model_name"], buckets=BUCKETS, registry=theirs).labels(
        "m"
    )
    for v in VALUES:
        fast.observe(v)
        reference.observe(v)
    got, want = _samples(ours), _samples(theirs)
    assert got == want
    assert got[("weir:x_seconds_count", (("model_name", "m"),))] == len(VALUES)
    assert got[("weir:x_seconds_bucket", (("le", "0.01"), ("model_name", "m")))] == 2  # 0.0 and 0.01
    assert got[("weir:x_seconds_bucket", (("le", "+Inf"), ("model_name", "m")))] == len(VALUES)
