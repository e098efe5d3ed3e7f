"""use_beam_search on /v1/completions and /v1/chat/completions: the n best beams, once, and each
refusal's exact 400. Through the OpenAI SDK (extra_body) and raw HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.app.conftest import MODEL_NAME, LiveServer, wait_until

COMP = "/v1/completions"
CHAT = "/v1/chat/completions"
BEAM = {"use_beam_search": True, "length_penalty": 1.0, "early_stopping": False}


def _comp(**kw: object) -> dict:
    return {"model": MODEL_NAME, "prompt": "Return the", "max_tokens": 6, "n": 3, **BEAM, **kw}


@pytest.fixture(scope="module")
def offline_beams(real_engine_config) -> list:
    """The same model's beams offline (LLM.beam_search): what the server must answer."""
    from engine import LLM, BeamSearchParams

    llm = LLM(real_engine_config.model, device="cpu", dtype="float32", max_model_len=128)
    (out,) = llm.beam_search(["Return the"], BeamSearchParams(beam_width=3, max_tokens=6))
    llm.shutdown()
    return out.sequences


def test_sdk_completion_returns_the_n_best_beams(server: LiveServer, offline_beams: list) -> None:
    sdk = openai.OpenAI(base_url=server.api_url, api_key="unused")
    r = sdk.completions.create(model=MODEL_NAME, prompt="Return the", max_tokens=6, n=3, extra_body=BEAM)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [b.text for b in offline_beams]
    assert len({b.text for b in offline_beams}) == 3  # three different beams, best first
    prompt_len = r.usage.prompt_tokens
    assert r.usage.completion_tokens == sum(len(b.tokens) - prompt_len for b in offline_beams)


def test_raw_http_chat_beam_search(client: httpx.Client) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "n": 2,
        **BEAM,
    }
    r = client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["message"]["role"] == "assistant" for c in choices)
    assert all(c["finish_reason"] in ("stop", "length") for c in choices)
    assert choices[0]["message"]["content"] != choices[1]["message"]["content"]


def test_streamed_beam_search_sends_the_final_beams_only(client: httpx.Client) -> None:
    whole = client.post(COMP, json=_comp()).json()
    with client.stream("POST", COMP, json=_comp(stream=True)) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts: dict[int, list[str]] = {}
    for event in events:
        for choice in event["choices"]:
            texts.setdefault(choice["index"], []).append(choice["text"])
    # Each beam's text arrives whole, in one event, with the non-streamed answer's text.
    assert {i: "".join(t) for i, t in texts.items()} == {c["index"]: c["text"] for c in whole["choices"]}
    assert all(len([t for t in ts if t]) <= 1 for ts in texts.values())


def _error(message: str, param: str) -> dict:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": "invalid_value",
        }
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            _comp(temperature=0.7),
            _error("beam search needs temperature 0 (it is deterministic); got 0.7", "temperature"),
        ),
        (
            _comp(n=17),
            _error("beam search width (n) must be at most 16 (the server's max_beam_width); got 17", "n"),
        ),
        (_comp(top_p=0.5), _error("top_p is not supported with beam search (use_beam_search)", "top_p")),
        (_comp(min_p=0.1), _error("min_p is not supported with beam search (use_beam_search)", "min_p")),
        (
            _comp(n=2, best_of=2, top_k=3),
            _error("top_k is not supported with beam search (use_beam_search)", "top_k"),
        ),
        (
            _comp(early_stopping="soon"),
            _error("early_stopping must be true, false or \"never\"; got 'soon'", "early_stopping"),
        ),
    ],
    ids=["temperature", "width", "top_p", "min_p", "top_k", "early_stopping"],
)
def test_bad_beam_search_is_a_400(client: httpx.Client, body: dict, expected: dict) -> None:
    r = client.post(COMP, json=body)
    assert r.status_code == 400
    assert r.json() == expected


def test_beam_searches_dropped_by_their_clients_free_everything(
    server: LiveServer, offline_beams: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight long beam searches (ranked on the device, a step in flight), streamed and not, whose
    clients go away mid-search: the server aborts every group, the KV cache empties, and the next beam
    search gets the offline beams."""
    import asyncio
    import time

    engine = server.engine
    # Steps of at least 20 ms (the launch runs on the engine's worker thread): a search of 100 tokens
    # then lasts 2 s, so it is still running when its client goes, however loaded the machine (the
    # tiny model's own steps took a 100-token search through in 0.64 s under a loaded CI).
    executor = engine.engine.executor
    real_launch = executor.launch

    def slow_launch(*args: object) -> object:
        time.sleep(0.02)
        return real_launch(*args)

    monkeypatch.setattr(executor, "launch", slow_launch)
    body = _comp(n=4, max_tokens=100, ignore_eos=True)  # the prompt + 100 within max_model_len 128

    async def dropped() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:

            async def one(i: int) -> None:
                async def run() -> tuple[int, bytes]:
                    if i % 2:
                        async with c.stream("POST", COMP, json={**body, "stream": True}) as r:
                            data = b"".join([chunk async for chunk in r.aiter_bytes()])
                            return r.status_code, data[-300:]
                    r = await c.post(COMP, json=body)
                    return r.status_code, r.content[-300:]

                task = asyncio.ensure_future(run())
                # Gone once the engine runs every search (all beams of the 8 groups at once: one watcher
                # decides for all, since the first drops shrink num_running for the others).
                await asyncio.wait(
                    {task, asyncio.ensure_future(all_running.wait())}, return_when="FIRST_COMPLETED"
                )
                assert not task.done(), task.result()  # still searching when its client goes (not refused)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

            async def watch() -> None:
                deadline = asyncio.get_running_loop().time() + 10
                while engine.stats().num_running < 32:
                    assert asyncio.get_running_loop().time() < deadline, engine.stats()
                    await asyncio.sleep(0.01)
                all_running.set()

            all_running = asyncio.Event()
            await asyncio.gather(watch(), *(one(i) for i in range(8)))

    asyncio.run(dropped())
    assert wait_until(lambda: engine.stats().num_running + engine.stats().num_waiting == 0, timeout=15)
    assert wait_until(lambda: engine.stats().kv_cache_usage == 0.0, timeout=5)
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        r = c.post(COMP, json=_comp())
    assert r.status_code == 200
    assert [ch["text"] for ch in r.json()["choices"]] == [b.text for b in offline_beams]


@pytest.mark.parametrize(
    ("path", "field", "value", "shown"),
    [
        (COMP, "length_penalty", 2.0, "2.0"),
        (CHAT, "length_penalty", -1.0, "-1.0"),
        (COMP, "early_stopping", True, "True"),
        (CHAT, "early_stopping", "never", "'never'"),
        (COMP, "early_stopping", "soon", "'soon'"),
    ],
)
def test_beam_fields_without_beam_search_are_a_400(
    client: httpx.Client, path: str, field: str, value: object, shown: str
) -> None:
    """Beam search's own fields change nothing without use_beam_search: refused by name (as vLLM v0),
    not accepted and silently ignored. Their defaults stay fine."""
    prompt = {"prompt": "Return the"} if path == COMP else {"messages": [{"role": "user", "content": "hi"}]}
    r = client.post(path, json={"model": MODEL_NAME, **prompt, "max_tokens": 2, field: value})
    assert r.status_code == 400
    default = "false" if field == "early_stopping" else "1.0"
    assert r.json() == _error(
        f"{field} is only used by beam search (use_beam_search); without it leave {field} out or "
        f"{default}; got {shown}",
        field,
    )
    defaults = {"length_penalty": 1.0, "early_stopping": False}
    r = client.post(path, json={"model": MODEL_NAME, **prompt, "max_tokens": 2, **defaults})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"logprobs": True}, "logprobs"), ({"logprobs": True, "top_logprobs": 2}, "top_logprobs")],
)
def test_chat_beam_search_with_logprobs_names_the_field_sent(
    client: httpx.Client, extra: dict, param: str
) -> None:
    """`logprobs: true` alone is refused naming logprobs (it named top_logprobs, a field not sent)."""
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "n": 2,
        **BEAM,
    }
    r = client.post(CHAT, json={**body, **extra})
    assert r.status_code == 400
    assert r.json() == _error("logprobs is not supported with beam search (use_beam_search)", param)


@pytest.mark.parametrize(("length_penalty", "max_tokens"), [(-12.0, 8), (-5.0, 100)])
def test_a_negative_length_penalty_still_returns_n_beams(
    client: httpx.Client, length_penalty: float, max_tokens: int
) -> None:
    """A negative length_penalty multiplies a finished beam's score by its length's power (-20 * 8**12),
    past transformers' -1e9 'empty slot' score: the search kept empty slots over real results and
    answered 200 with no choices (or fewer than n). Now n beams, best first."""
    body = _comp(prompt="The json module", max_tokens=max_tokens, n=2, length_penalty=length_penalty)
    r = client.post(COMP, json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") for c in choices)
    assert choices[0]["text"] != choices[1]["text"]
