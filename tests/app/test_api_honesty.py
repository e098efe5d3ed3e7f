"""What a request asks for and weir cannot do is a 400 that says so, on a live server with the real
engine: JSON nested too deeply (not a 500), a request larger than the waiting queue itself (not a
429 to retry forever), and OpenAI fields weir does not implement (not a 200 that ignores them).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.app.conftest import MODEL_NAME, LiveServer, start_server

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


def _error(r: httpx.Response, status: int, code: str, param: str | None) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def small_queue_server(real_engine_config) -> Iterator[LiveServer]:
    """The real engine with a small waiting queue: 8 sequences, 100 prompt tokens."""
    import dataclasses

    from engine.async_engine import AsyncEngine

    config = dataclasses.replace(
        real_engine_config, max_model_len=256, max_waiting_requests=8, max_waiting_tokens=100
    )
    live = start_server(AsyncEngine(config))
    yield live
    live.stop()


# ---------------------------------------------------------------- bug 3: nesting


@pytest.mark.parametrize(
    ("path", "field"),
    [(COMP, "prompt"), (COMP, "unknown_field"), (CHAT, "unknown_field"), (CHAT, "tools"), ("/tokenize", "x")],
)
def test_deeply_nested_json_is_400(client: httpx.Client, path: str, field: str) -> None:
    depth = 100_000
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "%s": %s%s}' % (
        MODEL_NAME.encode(),
        field.encode(),
        b"[" * depth,
        b"]" * depth,
    )
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    err = _error(r, 400, "invalid_json", None)
    assert "nests JSON arrays or objects too deeply" in err["message"]
    deep_object = b'{"a":' * depth + b"1" + b"}" * depth
    r = client.post(path, content=b'{"prompt": "hi", "x": %s}' % deep_object)
    _error(r, 400, "invalid_json", None)
    assert client.get("/health").status_code == 200


# ---------------------------------------------------------------- bug 4: larger than the queue


def test_more_sequences_than_the_queue_holds_is_400(client: httpx.Client) -> None:
    """The issue's case: n=128 over 9 prompts against the default queue of 1,024."""
    r = client.post(COMP, json={"model": MODEL_NAME, "prompt": ["a"] * 9, "n": 128, "max_tokens": 1})
    err = _error(r, 400, "exceeds_queue_bound", "n")
    assert "1152 places" in err["message"] and "holds 1024 (max_waiting_requests)" in err["message"]
    assert "retry-after" not in r.headers


def test_requests_larger_than_a_small_queue(small_queue_server: LiveServer) -> None:
    with httpx.Client(base_url=small_queue_server.base_url, timeout=60) as c:
        r = c.post(COMP, json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1})
        _error(r, 400, "exceeds_queue_bound", "n")
        r = c.post(COMP, json={"prompt": ["a"] * 9, "max_tokens": 1})
        assert "max_waiting_requests" in _error(r, 400, "exceeds_queue_bound", "prompt")["message"]
        r = c.post(COMP, json={"prompt": [7] * 150, "max_tokens": 1})
        err = _error(r, 400, "exceeds_queue_bound", "prompt")
        assert (
            "150 prompt tokens x n=1" in err["message"] and "holds 100 (max_waiting_tokens)" in err["message"]
        )
        r = c.post(COMP, json={"prompt": [7] * 40, "n": 3, "max_tokens": 1})
        _error(r, 400, "exceeds_queue_bound", "prompt")
        content = "word " * 40  # ~130 tokens: fits the context (256), not the queue (100)
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": content}], "max_tokens": 1})
        assert "max_waiting_tokens" in _error(r, 400, "exceeds_queue_bound", "messages")["message"]
        # Exactly at the bounds is admitted.
        r = c.post(COMP, json={"prompt": [[7] * 25] * 2, "n": 2, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4


# ---------------------------------------------------------------- bug 5: fields weir cannot honour

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (CHAT, "tools", [TOOL]),
        (CHAT, "tool_choice", "auto"),
        (CHAT, "tool_choice", {"type": "function", "function": {"name": "f"}}),
        (CHAT, "functions", [{"name": "f"}]),
        (CHAT, "function_call", "auto"),
        (CHAT, "response_format", {"type": "json_object"}),
        (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        (COMP, "response_format", {"type": "json_object"}),
        (CHAT, "modalities", ["text", "audio"]),
        (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
        (CHAT, "web_search_options", {}),
        (CHAT, "stream_options", {"include_usage": True, "continuous_usage_stats": True}),
        # vLLM's extra fields that change the output: refused, not ignored as unknown fields are
        (COMP, "guided_json", {"type": "object"}),
        (CHAT, "guided_regex", "a+"),
        (CHAT, "guided_choice", ["yes", "no"]),
        (COMP, "guided_grammar", "root ::= 'a'"),
        (CHAT, "guided_decoding_backend", "xgrammar"),
        (CHAT, "structured_outputs", {"json": {"type": "object"}}),
        (COMP, "prompt_logprobs", 1),
        (COMP, "truncate_prompt_tokens", 5),
        (CHAT, "allowed_token_ids", [1, 2]),
        (COMP, "bad_words", ["x"]),
        (COMP, "logits_processors", ["m.f"]),
        (COMP, "return_tokens_as_token_ids", True),
        (COMP, "add_special_tokens", False),
        (CHAT, "add_special_tokens", True),
        (CHAT, "chat_template", "{{ messages }}"),
        (CHAT, "chat_template_kwargs", {"enable_thinking": False}),
        (CHAT, "documents", [{"text": "d"}]),
        (CHAT, "continue_final_message", True),
        (CHAT, "echo", True),
        (CHAT, "best_of", 3),  # vLLM's chat field: was an unknown field, silently ignored
    ],
)
def test_unsupported_fields_are_400(client: httpx.Client, path: str, field: str, value: object) -> None:
    body = {"model": MODEL_NAME, "max_tokens": 1, field: value}
    body.update({"messages": MSGS} if path == CHAT else {"prompt": "hi"})
    param = "stream_options.continuous_usage_stats" if field == "stream_options" else field
    err = _error(client.post(path, json=body), 400, "unsupported", param)
    assert err["message"].startswith(f"{param} is not supported")


@pytest.mark.parametrize("path", [COMP, CHAT])
@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream_are_400(client: httpx.Client, path: str, stream: bool | None) -> None:
    """Not silently ignored: OpenAI's API refuses stream_options on a request that does not stream."""
    body = {"model": MODEL_NAME, "max_tokens": 1, "stream_options": {"include_usage": True}}
    body.update({"messages": MSGS} if path == CHAT else {"prompt": "hi"})
    if stream is not None:
        body["stream"] = stream
    err = _error(client.post(path, json=body), 400, "invalid_value", "stream_options")
    assert err["message"] == "stream_options is only allowed when stream is true"
    body.update(stream=True)
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        r.read()


def test_max_tokens_and_max_completion_tokens_must_agree(client: httpx.Client) -> None:
    """Both set and different: one would be silently ignored, so 400; both the same is fine."""
    body = {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 3, "max_completion_tokens": 2}
    err = _error(client.post(CHAT, json=body), 400, "invalid_value", "max_tokens")
    assert err["message"] == (
        "max_tokens (3) and max_completion_tokens (2) disagree; set one of them (max_tokens is the deprecated name)"
    )
    body["max_tokens"] = 2
    r = client.post(CHAT, json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_vllm_extra_fields_at_what_weir_does_are_fine(client: httpx.Client) -> None:
    """The same fields at their defaults, or at what weir does anyway (special tokens added to a
    completion's prompt, not to a rendered chat), answer 200."""
    comp = {
        "model": MODEL_NAME,
        "prompt": "hi",
        "max_tokens": 1,
        "add_special_tokens": True,
        "guided_json": None,
    }
    assert client.post(COMP, json=comp).status_code == 200
    chat = {
        "model": MODEL_NAME,
        "messages": MSGS,
        "max_tokens": 1,
        "add_special_tokens": False,
        "echo": False,
    }
    chat.update(continue_final_message=False, documents=[], chat_template_kwargs={}, bad_words=[], best_of=1)
    assert client.post(CHAT, json=chat).status_code == 200


def test_unsupported_fields_at_their_defaults_are_fine(client: httpx.Client) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": MSGS,
        "max_tokens": 1,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "audio": None,
        "parallel_tool_calls": True,  # ignored, as the README lists
        "store": False,
        "metadata": {"k": "v"},
    }
    assert client.post(CHAT, json=body).status_code == 200


def test_tool_calls_in_history_are_400(client: httpx.Client) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [call]}]
    _error(client.post(CHAT, json={"messages": msgs}), 400, "unsupported", "messages[1].tool_calls")


# ---------------------------------------------------------------- what a response gives away


def test_models_do_not_expose_the_server_path(client: httpx.Client, server: LiveServer) -> None:
    card = client.get("/v1/models").json()["data"][0]
    model_dir = str(server.engine.model_path)
    assert card["root"] == model_dir.rstrip("/").rsplit("/", 1)[-1]
    assert "/" not in card["root"] and model_dir not in client.get("/v1/models").text


def test_unknown_model_name_is_not_echoed_in_full(client: httpx.Client) -> None:
    name = "m" * 100_000
    r = client.post(COMP, json={"model": name, "prompt": "hi"})
    err = _error(r, 404, "model_not_found", "model")
    assert f"`{'m' * 100}...`" in err["message"] and len(r.content) < 1000


@pytest.mark.parametrize(
    "stop",
    [[""], ["x" * 1025], [str(i) for i in range(65)], 5, [1], {"a": 1}],
    ids=["empty", "too-long", "too-many", "int", "int-list", "object"],
)
def test_every_bad_stop_names_stop(client: httpx.Client, stop: object) -> None:
    for path, body in ((COMP, {"prompt": "hi"}), (CHAT, {"messages": MSGS})):
        r = client.post(path, json={**body, "stop": stop, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] in ("stop", "stop[0]"), r.text
