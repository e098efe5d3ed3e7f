"""Every bad input: exact status, OpenAI's error envelope, the field named in `param`; and the
server keeps serving after each.
"""

from __future__ import annotations

import httpx
import pytest

from tests.app.conftest import MODEL_NAME, wait_until

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


def _chat(**kw: object) -> dict:
    return {"model": MODEL_NAME, "messages": MSGS, **kw}


def _comp(**kw: object) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hello", **kw}


# (id, path, json body, status, param, code, text the message must contain)
CASES = [
    (
        "max_tokens_type",
        COMP,
        _comp(max_tokens="ten"),
        400,
        "max_tokens",
        "invalid_type",
        "Expected `int | null`",
    ),
    ("n_float", CHAT, _chat(n=1.5), 400, "n", "invalid_type", "Expected `int | null`"),
    ("stream_type", CHAT, _chat(stream="yes"), 400, "stream", "invalid_type", "Expected"),
    (
        "messages_missing",
        CHAT,
        {"model": MODEL_NAME},
        400,
        "messages",
        "invalid_type",
        "missing required field",
    ),
    (
        "messages_empty",
        CHAT,
        _chat(messages=[]),
        400,
        "messages",
        "invalid_value",
        "messages must not be empty",
    ),
    (
        "role_missing",
        CHAT,
        _chat(messages=[{"content": "x"}]),
        400,
        "messages[0].role",
        "invalid_type",
        "role",
    ),
    (
        "role_bad",
        CHAT,
        _chat(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "messages[0].role",
        "invalid_value",
        "'wizard'",
    ),
    (
        "content_part_image",
        CHAT,
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content[0].type",
        "unsupported",
        "only text content parts",
    ),
    (
        "user_content_null",
        CHAT,
        _chat(messages=[{"role": "user", "content": None}]),
        400,
        "messages[0].content",
        "invalid_value",
        "must not be null",
    ),
    ("prompt_missing", COMP, {"model": MODEL_NAME}, 400, "prompt", "invalid_type", "missing required field"),
    ("prompt_empty_str", COMP, _comp(prompt=""), 400, "prompt", "invalid_value", "prompt must not be empty"),
    ("prompt_empty_list", COMP, _comp(prompt=[]), 400, "prompt", "invalid_value", "prompt must not be empty"),
    (
        "prompt_empty_ids",
        COMP,
        _comp(prompt=[[]]),
        400,
        "prompt",
        "invalid_value",
        "prompt must not be empty",
    ),
    ("prompt_shape", COMP, _comp(prompt={"a": 1}), 400, "prompt", "invalid_value", "prompt must be a string"),
    ("prompt_mixed", COMP, _comp(prompt=["a", 1]), 400, "prompt", "invalid_value", "prompt must be a string"),
    ("prompt_token_vocab", COMP, _comp(prompt=[1, 512]), 400, "prompt", "invalid_value", "token id 512"),
    ("prompt_token_negative", COMP, _comp(prompt=[[1, -1]]), 400, "prompt", "invalid_value", "token id -1"),
    # A JSON true is not a token id, though Python's bool is an int.
    ("prompt_token_bool", COMP, _comp(prompt=[1, True]), 400, "prompt", "invalid_value", "prompt must be a"),
    ("prompt_nested_float", COMP, _comp(prompt=[[1], [2, 1.5]]), 400, "prompt", "invalid_value", "must be a"),
    (
        "prompt_nested_vocab",
        COMP,
        _comp(prompt=[[1, 2], [3, 512]]),
        400,
        "prompt",
        "invalid_value",
        "prompt contains token id 512, outside the vocabulary [0, 512)",
    ),
    (
        "prompt_too_long",
        COMP,
        _comp(prompt=[5] * 128),
        400,
        "prompt",
        "context_length_exceeded",
        "128 tokens",
    ),
    (
        "prompt_plus_max_tokens",
        COMP,
        _comp(prompt=[5] * 100, max_tokens=40),
        400,
        "max_tokens",
        "context_length_exceeded",
        "140 tokens (100 in the prompt, 40 in max_tokens)",
    ),
    (
        "chat_plus_max_completion_tokens",
        CHAT,
        _chat(max_completion_tokens=1000),
        400,
        "max_completion_tokens",
        "context_length_exceeded",
        "maximum context length is 128 tokens",
    ),
    ("temperature_range", COMP, _comp(temperature=-1), 400, "temperature", "invalid_value", "[0.0, 100.0]"),
    ("top_p_range", CHAT, _chat(top_p=1.5), 400, "top_p", "invalid_value", "top_p must be in"),
    ("top_k_range", COMP, _comp(top_k=-5), 400, "top_k", "invalid_value", "top_k"),
    ("min_p_range", COMP, _comp(min_p=2), 400, "min_p", "invalid_value", "min_p"),
    (
        "presence_penalty",
        COMP,
        _comp(presence_penalty=5),
        400,
        "presence_penalty",
        "invalid_value",
        "[-2.0, 2.0]",
    ),
    (
        "frequency_penalty",
        CHAT,
        _chat(frequency_penalty=-3),
        400,
        "frequency_penalty",
        "invalid_value",
        "-2.0",
    ),
    (
        "repetition_penalty",
        COMP,
        _comp(repetition_penalty=0),
        400,
        "repetition_penalty",
        "invalid_value",
        "(0.0",
    ),
    ("n_zero", COMP, _comp(n=0), 400, "n", "invalid_value", "n must be in [1, 128]"),
    ("n_too_large", CHAT, _chat(n=1000), 400, "n", "invalid_value", "n must be in [1, 128]; got 1000"),
    (
        "best_of_below_n",
        COMP,
        _comp(n=2, best_of=1),
        400,
        "best_of",
        "invalid_value",
        "best_of must be in [2, 128]; got 1",
    ),
    (
        "too_many_stops",
        COMP,
        _comp(stop=[f"s{i}" for i in range(65)]),
        400,
        "stop",
        "invalid_value",
        "at most 64",
    ),
    ("empty_stop", CHAT, _chat(stop=[""]), 400, "stop", "invalid_value", "stop strings must not be empty"),
    ("stop_token_vocab", COMP, _comp(stop_token_ids=[9999]), 400, "stop_token_ids", "invalid_value", "9999"),
    ("logit_bias_vocab", CHAT, _chat(logit_bias={"9999": 1}), 400, "logit_bias", "invalid_value", "9999"),
    # a bad value: param names logit_bias (msgspec's path for a dict value is `logit_bias[...]`)
    (
        "logit_bias_value_type",
        COMP,
        _comp(logit_bias={"5": "x"}),
        400,
        "logit_bias",
        "invalid_type",
        "got `str`",
    ),
    ("logit_bias_key", CHAT, _chat(logit_bias={"abc": 1}), 400, "logit_bias", "invalid_value", "'abc'"),
    # int() takes these too; "05" and "5" would name one token twice, one bias silently dropped
    (
        "logit_bias_key_zero_padded",
        COMP,
        _comp(logit_bias={"5": 10, "05": -10}),
        400,
        "logit_bias",
        "invalid_value",
        "logit_bias keys must be token ids written as decimal integers (\"5\"); got '05'",
    ),
    ("logit_bias_key_spaces", COMP, _comp(logit_bias={" 5": 1}), 400, "logit_bias", "invalid_value", "' 5'"),
    (
        "logit_bias_key_underscore",
        CHAT,
        _chat(logit_bias={"1_0": 1}),
        400,
        "logit_bias",
        "invalid_value",
        "'1_0'",
    ),
    (
        "logit_bias_key_non_ascii",
        COMP,
        _comp(logit_bias={"\u0665": 1}),
        400,
        "logit_bias",
        "invalid_value",
        "decimal",
    ),
    (
        "logit_bias_range",
        COMP,
        _comp(logit_bias={"5": 500}),
        400,
        "logit_bias",
        "invalid_value",
        "[-100.0, 100.0]",
    ),
    (
        "logprobs_range",
        COMP,
        _comp(logprobs=21),
        400,
        "logprobs",
        "invalid_value",
        "logprobs must be in [0, 20]",
    ),
    (
        "top_logprobs_alone",
        CHAT,
        _chat(top_logprobs=2),
        400,
        "top_logprobs",
        "invalid_value",
        "requires logprobs",
    ),
    (
        "top_logprobs_range",
        CHAT,
        _chat(logprobs=True, top_logprobs=21),
        400,
        "top_logprobs",
        "invalid_value",
        "[0, 20]",
    ),
    (
        "min_tokens",
        COMP,
        _comp(min_tokens=10, max_tokens=2),
        400,
        "min_tokens",
        "invalid_value",
        "min_tokens",
    ),
    (
        # max_tokens unset: the rest of the context, fewer tokens than min_tokens (was silently cut short)
        "min_tokens_over_the_context",
        CHAT,
        _chat(min_tokens=500),
        400,
        "min_tokens",
        "invalid_value",
        "min_tokens must be at most the ",
    ),
    (
        "min_tokens_over_the_context_completions",
        COMP,
        _comp(prompt=[5] * 100, max_tokens=None, min_tokens=29),
        400,
        "min_tokens",
        "invalid_value",
        "min_tokens must be at most the 28 tokens the context leaves after the prompt (100 of max_model_len "
        "128 tokens); got 29",
    ),
    ("seed_type", COMP, _comp(seed="x"), 400, "seed", "invalid_type", "Expected `int | null`"),
    ("suffix", COMP, _comp(suffix="x"), 400, "suffix", "unsupported", "suffix is not supported"),
    (
        "unknown_model",
        CHAT,
        _chat(model="gpt-4o"),
        404,
        "model",
        "model_not_found",
        "`gpt-4o` does not exist",
    ),
    (
        "tokenize_both",
        "/tokenize",
        {"prompt": "a", "messages": MSGS},
        400,
        "prompt",
        "invalid_value",
        "exactly one",
    ),
    ("detokenize_vocab", "/detokenize", {"tokens": [1, 600]}, 400, "tokens", "invalid_value", "token id 600"),
]


def _check_envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    return err


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(
    client: httpx.Client, path: str, body: dict, status: int, param: str, code: str, text: str
) -> None:
    err = _check_envelope(client.post(path, json=body), status)
    assert err["param"] == param, err
    assert err["code"] == code, err
    assert text in err["message"], err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}],
        [],
    ],
    ids=["role", "content_null", "part_text", "part_type", "tool_calls", "empty"],
)
def test_chat_route_and_llm_chat_refuse_a_message_alike(client: httpx.Client, messages: list) -> None:
    """The route and LLM.chat check messages with one function (engine/inputs/chat_messages.py):
    the same message and field for the same input."""
    from engine.errors import InvalidRequestError, UnsupportedRequestError
    from engine.inputs.chat_messages import conversation_of

    err = _check_envelope(client.post(CHAT, json=_chat(messages=messages)), 400)
    with pytest.raises(InvalidRequestError) as exc:
        conversation_of(messages)
    assert (err["message"], err["param"]) == (str(exc.value), exc.value.param)
    assert err["code"] == (
        "unsupported" if isinstance(exc.value, UnsupportedRequestError) else "invalid_value"
    )


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_type"),
    ],
    ids=["malformed", "empty", "not_an_object"],
)
def test_bad_json(client: httpx.Client, raw: bytes, status: int, code: str) -> None:
    r = client.post(COMP, content=raw, headers={"content-type": "application/json"})
    err = _check_envelope(r, status)
    assert err["code"] == code and err["param"] is None


def test_wrong_content_type_is_415(client: httpx.Client) -> None:
    r = client.post(COMP, content=b"prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"})
    err = _check_envelope(r, 415)
    assert err["code"] == "unsupported_media_type"
    assert "application/json" in err["message"]


def test_body_too_large_is_413(client: httpx.Client, server) -> None:
    limit = server.state.config.max_body_bytes
    r = client.post(
        COMP, content=b'{"prompt": "' + b"a" * limit + b'"}', headers={"content-type": "application/json"}
    )
    err = _check_envelope(r, 413)
    assert err["code"] == "request_too_large" and str(limit) in err["message"]


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert _check_envelope(client.get("/v1/nope"), 404)["code"] == "not_found"
    assert _check_envelope(client.get(COMP), 405)["code"] == "invalid_request"


def test_unknown_fields_are_ignored_and_user_accepted(client: httpx.Client) -> None:
    r = client.post(COMP, json=_comp(max_tokens=2, user="u-1", frobnicate={"x": 1}, response_format=None))
    assert r.status_code == 200, r.text
    # explicit nulls, as many clients send, mean "default"
    r = client.post(
        CHAT, json=_chat(max_tokens=2, n=None, temperature=None, stop=None, seed=None, top_p=None)
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_unknown_fields_logged_at_debug(client: httpx.Client) -> None:
    import logging

    import structlog

    logger = logging.getLogger("weir.app")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with structlog.testing.capture_logs() as logs:
            r = client.post(COMP, json=_comp(max_tokens=1, frobnicate=1, best_effort=True))
    finally:
        logger.setLevel(old)
    assert r.status_code == 200
    (entry,) = [e for e in logs if e["event"] == "ignoring unknown fields"]
    assert entry["fields"] == ["best_effort", "frobnicate"]


def test_server_keeps_serving_after_errors(client: httpx.Client) -> None:
    for _, path, body, *_ in CASES:
        client.post(path, json=body)
    r = client.post(CHAT, json=_chat(max_tokens=3, ignore_eos=True))
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").status_code == 200


def test_engine_refusals_keep_the_apps_words(client: httpx.Client) -> None:
    """The prompt checks live in the engine's input processor; the client still reads OpenAI's wording
    with its own field names, word for word, and (for several prompts) nothing is left queued."""
    n_chat = client.post("/tokenize", json={"messages": MSGS}).json()["count"]
    cases = [
        (
            _comp(prompt=[5] * 128),
            "prompt",
            "This model's maximum context length is 128 tokens. However, the prompt has 128 tokens, which "
            "leaves no room for the completion. Please shorten the prompt.",
        ),
        (
            _comp(prompt=[[5, 6], [5] * 100], max_tokens=40),
            "max_tokens",
            "This model's maximum context length is 128 tokens. However, you requested 140 tokens (100 in "
            "the prompt, 40 in max_tokens). Please reduce the length of the prompt or max_tokens.",
        ),
        (
            _chat(max_completion_tokens=120),  # fits by its characters, not by its tokens
            "max_completion_tokens",
            f"This model's maximum context length is 128 tokens. However, you requested {n_chat + 120} "
            f"tokens ({n_chat} in the messages, 120 in max_completion_tokens). Please reduce the length of "
            "the messages or max_completion_tokens.",
        ),
    ]
    for body, param, message in cases:
        path = CHAT if "messages" in body else COMP
        err = _check_envelope(client.post(path, json=body), 400)
        assert err == {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": "context_length_exceeded",
        }
    err = _check_envelope(client.post(COMP, json=_comp(prompt=[[1, 2], [3, 512]])), 400)
    assert err == {
        "message": "prompt contains token id 512, outside the vocabulary [0, 512)",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "invalid_value",
    }
    r = client.post(COMP, json=_comp(max_tokens=2, ignore_eos=True))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_refused_prompt_leaves_none_of_the_requests_prompts_running(client: httpx.Client, server) -> None:
    """A list of prompts is all or none: the first prompt's engine request, added before the engine
    refused the second, used to run on to max_tokens after the 400 (its stream was closed unread, and
    closing an async generator that never started runs none of its cleanup), outputs piling up unread."""
    engine = server.engine
    body = _comp(prompt=[[1, 2, 3], [3, 512]], max_tokens=100, ignore_eos=True, n=2)
    err = _check_envelope(client.post(COMP, json=body), 400)
    assert err["message"] == "prompt contains token id 512, outside the vocabulary [0, 512)"
    assert not engine.engine.has_unfinished_requests()
    assert engine._streams == {}
    assert wait_until(lambda: engine.stats().kv_cache_usage == 0.0)
    r = client.post(COMP, json=_comp(max_tokens=2, ignore_eos=True))  # and the engine serves on
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
