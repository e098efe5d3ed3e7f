"""/metrics (vLLM's names with a weir: prefix) appears and moves; API keys guard everything but
/health and /metrics; the per-request log line carries timings and token counts.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from engine.startup_phases import PHASES
from tests.app.conftest import MODEL_NAME, LiveServer, start_server
from tests.app.fake_engine import FakeEngine

ENGINE_SERIES = [
    "weir:num_requests_running",
    "weir:num_requests_waiting",
    "weir:kv_cache_usage_perc",
    "weir:prompt_tokens_total",
    "weir:generation_tokens_total",
    "weir:num_preemptions_total",
    "weir:prefix_cache_queries_total",
    "weir:prefix_cache_hits_total",
]
HISTOGRAMS = [
    "weir:time_to_first_token_seconds",
    "weir:inter_token_latency_seconds",
    "weir:e2e_request_latency_seconds",
    "weir:request_queue_time_seconds",
    "weir:request_prompt_tokens",
    "weir:request_generation_tokens",
]


def _scrape(c: httpx.Client) -> dict[tuple[str, tuple], float]:
    r = c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": MODEL_NAME, **labels}.items())))
    return samples.get(key, 0.0)


def test_metrics_appear_and_move(client: httpx.Client) -> None:
    before = _scrape(client)
    for name in ENGINE_SERIES:
        assert (name, (("model_name", MODEL_NAME),)) in before, name
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.read()
    after = _scrape(client)
    assert _value(after, "weir:request_success_total", finished_reason="length") == (
        _value(before, "weir:request_success_total", finished_reason="length") + 2
    )
    n = prompt_tokens  # per request; under one block, so the prefix cache has nothing to give
    assert 0 < n <= 16
    for name, grew in (
        ("weir:generation_tokens_total", 10),
        ("weir:prompt_tokens_total", 2 * n),
        ("weir:prefix_cache_queries_total", 2 * n),
        ("weir:prefix_cache_hits_total", 0),
    ):
        assert _value(after, name) == _value(before, name) + grew, name
    for name in HISTOGRAMS:  # one observation per request; inter-token: 4 gaps in each 5-token output
        grew = 8 if name == "weir:inter_token_latency_seconds" else 2
        assert _value(after, name + "_count") == _value(before, name + "_count") + grew, name
    assert (
        _value(after, "weir:request_generation_tokens_sum")
        == _value(before, "weir:request_generation_tokens_sum") + 10
    )
    assert _value(after, "weir:num_requests_running") == 0
    assert _value(after, "weir:kv_cache_usage_perc") == 0.0  # nothing running holds blocks
    # The step loop's phases: one request after the other, each a prefill and four decodes; and time
    # moved in the phases every step goes through.
    assert _value(after, "weir:engine_steps_total") == _value(before, "weir:engine_steps_total") + 10
    for phase in ("schedule", "launch", "device_wait", "loop_delay", "update", "idle"):
        key = ("weir:step_loop_seconds_total", (("model_name", MODEL_NAME), ("phase", phase)))
        assert key in after, phase
    for phase in ("schedule", "device_wait", "update"):
        moved = _value(after, "weir:step_loop_seconds_total", phase=phase) - _value(
            before, "weir:step_loop_seconds_total", phase=phase
        )
        assert moved > 0, phase


def test_request_log_line(client: httpx.Client) -> None:
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        t0 = time.perf_counter()
        r = client.post(
            "/v1/chat/completions",
            json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3},
        )
        wall_s = time.perf_counter() - t0
    assert r.status_code == 200
    (line,) = [entry for entry in logs if entry["event"] == "request finished"]
    assert line["request_id"] == r.json()["id"] == r.headers["x-request-id"]
    assert line["status"] == 200 and line["endpoint"] == "chat" and line["stream"] is False
    assert line["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    # Scheduled before the first token, which comes before the end; all within what the client waited
    # (the server rounds to 0.1 ms). A first token needs a forward pass: well over 0.1 ms.
    assert 0 <= line["queue_s"] <= line["ttft_s"] <= line["e2e_s"] <= wall_s + 1e-4
    assert line["ttft_s"] > 0


@pytest.fixture(scope="module")
def keyed_server(tiny_tokenizer_dir) -> LiveServer:
    live = start_server(FakeEngine(tiny_tokenizer_dir), api_key=["key-one", "key-two"])
    yield live
    live.stop()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Bearer key-one-and-more"}, 401),
        ({"Authorization": "Basic key-one"}, 401),
        ({"Authorization": "key-one"}, 401),
        ({"Authorization": "Bearer key-one"}, 200),
        ({"Authorization": "bearer key-two"}, 200),
    ],
)
def test_api_keys(keyed_server: LiveServer, headers: dict, status: int) -> None:
    with httpx.Client(base_url=keyed_server.base_url, timeout=30) as c:
        r = c.get("/v1/models", headers=headers)
        assert r.status_code == status, r.text
        r = c.post("/v1/completions", headers=headers, json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == status
        if status == 401:
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        # open endpoints
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_sdk_auth(keyed_server: LiveServer) -> None:
    bad = openai.OpenAI(base_url=keyed_server.api_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=keyed_server.api_url, api_key="key-two", max_retries=0)
    r = good.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert r.usage.completion_tokens == 2


def test_startup_phase_gauges(client: httpx.Client, server: LiveServer) -> None:
    """The start-up phases are exposed once the server listens: every phase, none negative, their sum
    within the total, the same figures as the engine's report (the "startup phases" log line)."""
    samples = _scrape(client)
    report = server.engine.startup_phases.report()
    phases = {
        name: _value(samples, "weir:startup_phase_seconds", phase=name)
        for name in (*PHASES, "other")
        if ("weir:startup_phase_seconds", (("model_name", MODEL_NAME), ("phase", name))) in samples
    }
    assert list(phases) == [*PHASES, "other"]
    assert phases == {key.removesuffix("_s"): value for key, value in report.items() if key != "total_s"}
    total = _value(samples, "weir:startup_seconds")
    assert total == report["total_s"]
    assert all(seconds >= 0 for seconds in phases.values()), phases
    assert sum(phases.values()) <= total + 0.001 * len(phases)  # each figure rounded to the ms
    # What this engine did before serving took time (the tokenizer loads beside the model: waiting
    # for it may take none; this fixture's settings are resolved by the test, so config can round to
    # 0 ms); CPU captures no CUDA graphs.
    for name in ("model_build", "weights", "kv_cache", "warmup", "server"):
        assert phases[name] > 0, name
    assert phases["cuda_graphs"] == 0.0
