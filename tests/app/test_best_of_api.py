"""best_of on /v1/completions: the n best of best_of samples, and each refusal's exact 400."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from app.errors import APIError
from app.submission import check_queue_bounds
from tests.app.conftest import MODEL_NAME

COMP = "/v1/completions"


def _comp(**kw: object) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 1.0, **kw}


def _error(message: str, param: str, code: str = "invalid_value") -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def test_best_of_returns_n_choices(client: httpx.Client) -> None:
    r = client.post(COMP, json=_comp(n=2, best_of=4, seed=1, ignore_eos=True))
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in choices)
    assert r.json()["usage"]["completion_tokens"] == 8  # the returned choices' tokens


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            _comp(n=1, best_of=2, stream=True),
            _error(
                "best_of (2) greater than n (1) is not supported with stream: the n best samples are "
                "known only when all have finished",
                "best_of",
            ),
        ),
        (_comp(n=3, best_of=2), _error("best_of must be in [3, 128]; got 2", "best_of")),
        (
            _comp(n=1, best_of=21),
            _error(
                "best_of must be at most 20 (the server's max_best_of) when it is greater than n; got 21",
                "best_of",
            ),
        ),
        (
            _comp(n=1, best_of=2, temperature=0),
            _error(
                "best_of must equal n (1) when using greedy sampling (temperature 0): every sample "
                "would be the same sequence; got best_of 2",
                "best_of",
            ),
        ),
    ],
    ids=["stream", "below_n", "above_max", "greedy"],
)
def test_bad_best_of_is_a_400(client: httpx.Client, body: dict, expected: dict) -> None:
    r = client.post(COMP, json=body)
    assert r.status_code == 400
    assert r.json() == expected
    # A stream with best_of == n still streams.
    ok = client.post(COMP, json=_comp(n=2, best_of=2, stream=True))
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/event-stream")


def test_best_of_counts_against_the_queue_bounds() -> None:
    state = SimpleNamespace(queue_bounds=(8, 1000))
    check_queue_bounds(state, [10, 10], 1, "prompt", best_of=4)  # 8 sequences fit
    with pytest.raises(APIError) as exc:
        check_queue_bounds(state, [10, 10, 10], 1, "prompt", best_of=4)
    err = exc.value
    assert (err.status, err.param, err.code) == (400, "best_of", "exceeds_queue_bound")
    assert str(err.message) == (
        "This request needs 12 places in the waiting queue (3 prompt(s) x best_of=4) but the server's "
        "whole queue holds 8 (max_waiting_requests), so it could never be admitted. Send fewer prompts "
        "or a smaller best_of."
    )
    with pytest.raises(APIError) as exc:
        check_queue_bounds(SimpleNamespace(queue_bounds=(100, 100)), [30], 1, "prompt", best_of=4)
    assert "(30 prompt tokens x best_of=4)" in str(exc.value.message)
