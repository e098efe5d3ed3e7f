"""/openapi.json describes the API from the msgspec types, and a schemathesis run over it against
the live server (real engine) finds no 5xx. Bounded: a fixed number of cases per operation.
"""

from __future__ import annotations

import itertools

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.app.conftest import LiveServer


def test_openapi_document(client: httpx.Client) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"} <= set(
        doc["paths"]
    )
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["required"] == ["messages"] and "max_completion_tokens" in chat["properties"]
    assert len(schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]) == 4
    assert "ErrorBody" in schemas and "429" in doc["paths"]["/v1/completions"]["post"]["responses"]


# Per operation and mode (8 valid-body, 4 invalid-body runs): 300 requests, well under a minute.
CASES_PER_OPERATION = 25


def test_no_server_errors(server: LiveServer) -> None:
    """Every operation, fuzzed from its schema (valid and invalid bodies): a 5xx is a bug."""
    api = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 10

    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):
        if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=CASES_PER_OPERATION,
            deadline=None,
            derandomize=True,  # the same cases every run: a failure reproduces
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        fuzz()
