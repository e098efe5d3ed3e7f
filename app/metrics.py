"""Prometheus metrics with vLLM's names under a `weir:` prefix, so existing dashboards port.

Two sources:
- the engine's own counters and gauges (`engine.stats()`), read at scrape time by a custom collector,
  so they are never stale and the step loop does no metrics work;
- per-request latencies and lengths, observed by the HTTP layer when a request finishes.

Each app gets its own CollectorRegistry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.loop_histogram import LoopHistogram
from engine.protocol import EngineClient

log = structlog.get_logger("weir.metrics")

# Buckets as vLLM's, trimmed to what a small server sees.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)


def _length_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (vLLM's build_1_2_5_buckets)."""
    out: list[int] = []
    base = 1
    while True:
        for m in (1, 2, 5):
            value = m * base
            if value > max_len:
                return out
            out.append(value)
        base *= 10


class EngineStatsCollector(Collector):
    """Turns one `engine.stats()` call per scrape into gauges and counters."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        try:
            s = self.engine.stats()
        except Exception:  # a dead engine must not break /metrics
            log.warning("engine stats unavailable", exc_info=True)
            return
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge(
            "weir:num_requests_running", "Number of requests in model execution batches.", s.num_running
        )
        yield gauge("weir:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting)
        yield gauge(
            "weir:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", float(s.kv_cache_usage)
        )
        yield counter("weir:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens_total)
        yield counter(
            "weir:generation_tokens", "Number of generation tokens processed.", s.generation_tokens_total
        )
        yield counter("weir:num_preemptions", "Cumulative number of preemptions.", s.num_preemptions)
        yield counter(
            "weir:prefix_cache_queries",
            "Prefix-cache queries, in number of queried tokens.",
            s.prefix_cache_queries,
        )
        yield counter(
            "weir:prefix_cache_hits", "Prefix-cache hits, in number of cached tokens.", s.prefix_cache_hits
        )
        if s.cache_config is not None:  # vLLM's cache_config_info: the KV cache's dtype and capacity
            info = GaugeMetricFamily(
                "weir:cache_config_info",
                "Information of the KV cache (dtype, block size, blocks).",
                labels=["model_name", *s.cache_config],
            )
            info.add_metric([self.model_name, *s.cache_config.values()], 1.0)
            yield info
        step_loop = s.step_loop  # None without a step loop (the test fake)
        if step_loop is not None:
            phases = CounterMetricFamily(
                "weir:step_loop_seconds",
                "Seconds the engine's step loop spent per phase (device_wait: the GPU is the bound; "
                "loop_delay: results waited for a busy event loop).",
                labels=["model_name", "phase"],
            )
            for phase, seconds in step_loop.items():
                if phase != "steps":
                    phases.add_metric([self.model_name, phase], seconds)
            yield phases
            yield counter(
                "weir:engine_steps", "Forward passes launched by the step loop.", step_loop["steps"]
            )
        if s.running_lora_adapters is not None and s.waiting_lora_adapters is not None:
            # vLLM's shape: the adapters are label values (comma-separated names), the value the time
            # of the reading; dashboards take the latest series.
            info = GaugeMetricFamily(
                "weir:lora_requests_info",
                "Running stats on LoRA requests.",
                labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )
            info.add_metric(
                [
                    str(s.max_loras),
                    ",".join(sorted(s.waiting_lora_adapters)),
                    ",".join(sorted(s.running_lora_adapters)),
                ],
                time.time(),
            )
            yield info


class StartupPhasesCollector(Collector):
    """Start-up's wall seconds per phase (engine/startup_phases.py), once the server listens: the
    same figures as the "startup phases" log line."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        phases = self.engine.startup_phases
        if not phases.finished:
            return
        report = phases.report()
        total = GaugeMetricFamily(
            "weir:startup_seconds",
            "Seconds from the process's start to the server listening (the sum of the start-up phases "
            "and of what none covers).",
            labels=["model_name"],
        )
        total.add_metric([self.model_name], report["total_s"])
        yield total
        by_phase = GaugeMetricFamily(
            "weir:startup_phase_seconds",
            "Seconds of start-up per phase (imports, config, tokenizer, model_build, weights, kv_cache, "
            "cuda_graphs, warmup, server; other: what no phase covers).",
            labels=["model_name", "phase"],
        )
        for key, seconds in report.items():
            if key != "total_s":
                by_phase.add_metric([self.model_name, key.removesuffix("_s")], seconds)
        yield by_phase


class ServerMetrics:
    """The app's registry and the per-request series the HTTP layer observes."""

    def __init__(self, engine: EngineClient, model_name: str, max_model_len: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(engine, model_name))
        self.registry.register(StartupPhasesCollector(engine, model_name))
        r = self.registry
        self.request_success = Counter(
            "weir:request_success",
            "Count of finished sequences, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._success_children: dict[str, Any] = {}
        self._model_name = model_name

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Any:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r).labels(model_name)

        self.ttft = histogram(
            "weir:time_to_first_token_seconds", "Time to first token in seconds.", _TTFT_BUCKETS
        )
        # Observed for every streamed token: a lock-free histogram (app/loop_histogram.py).
        self.itl = LoopHistogram(
            "weir:inter_token_latency_seconds",
            "Time between streamed outputs of a sequence, in seconds.",
            _ITL_BUCKETS,
            [model_name],
        )
        r.register(self.itl)
        self.e2e = histogram(
            "weir:e2e_request_latency_seconds", "End-to-end request latency in seconds.", _REQUEST_BUCKETS
        )
        self.queue_time = histogram(
            "weir:request_queue_time_seconds",
            "Time a request spent waiting before its first scheduling, in seconds.",
            _REQUEST_BUCKETS,
        )
        length_buckets = _length_buckets(max(max_model_len, 1))
        self.prompt_tokens = histogram(
            "weir:request_prompt_tokens", "Number of prefill tokens per request.", length_buckets
        )
        self.generation_tokens = histogram(
            "weir:request_generation_tokens", "Number of generated tokens per request.", length_buckets
        )

        # Per adapter; only served adapters have series (forget_lora drops an unloaded one's), so the
        # label's cardinality is bounded by what the operator loads.
        self.lora_requests = Counter(
            "weir:lora_requests",
            "Finished requests, by LoRA adapter.",
            ["model_name", "lora_name"],
            registry=r,
        )
        self.lora_generation_tokens = Counter(
            "weir:lora_generation_tokens",
            "Generated tokens, by LoRA adapter.",
            ["model_name", "lora_name"],
            registry=r,
        )

    def lora_finished(self, lora_name: str, num_generated: int) -> None:
        self.lora_requests.labels(self._model_name, lora_name).inc()
        self.lora_generation_tokens.labels(self._model_name, lora_name).inc(num_generated)

    def forget_lora(self, lora_name: str) -> None:
        """Drop an unloaded adapter's series."""
        for metric in (self.lora_requests, self.lora_generation_tokens):
            try:
                metric.remove(self._model_name, lora_name)
            except KeyError:
                pass  # it never finished a request

    def finished(self, reason: str) -> None:
        child = self._success_children.get(reason)
        if child is None:
            child = self._success_children[reason] = self.request_success.labels(self._model_name, reason)
        child.inc()
