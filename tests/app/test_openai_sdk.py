"""The server as users meet it: the official OpenAI SDK against the real engine on the tiny llama."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.app.conftest import MODEL_NAME, LiveServer


@pytest.fixture()
def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def async_sdk(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)


def _tokens(server: LiveServer, text: str) -> list[int]:
    return server.engine.tokenizer.encode(text)


def test_models_lists_the_served_name(sdk: openai.OpenAI, server: LiveServer) -> None:
    (card,) = sdk.models.list().data
    assert card.id == MODEL_NAME
    assert card.object == "model"
    assert card.owned_by == "weir"
    assert card.model_extra["max_model_len"] == 128
    assert isinstance(card.created, int)


def test_completion_non_stream(sdk: openai.OpenAI, server: LiveServer) -> None:
    r = sdk.completions.create(
        model=MODEL_NAME, prompt="Return the", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion"
    assert r.model == MODEL_NAME
    assert r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(_tokens(server, "Return the"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # shorter than a block: nothing to reuse
    assert choice.text == server.engine.tokenizer.decode(
        server.engine.tokenizer.encode(choice.text, add_special_tokens=False)
    )


def test_cached_tokens_count_the_reused_prefix(sdk: openai.OpenAI, server: LiveServer) -> None:
    """The same prompt twice: the second reuses every full block but the one holding the last token."""
    prompt = "cached_tokens: " + " ".join(f"word{i}" for i in range(8))
    n = len(_tokens(server, prompt))
    block_size = 16  # the engine's default, which the test server keeps
    expected = (n - 1) // block_size * block_size
    assert expected >= 2 * block_size  # the prompt spans several blocks
    usages = []
    for _ in range(2):
        r = sdk.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
        usages.append(r.usage)
    assert [u.prompt_tokens for u in usages] == [n, n]
    assert [u.prompt_tokens_details.cached_tokens for u in usages] == [0, expected]


def test_completion_default_max_tokens_is_16(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(
        model=MODEL_NAME, prompt="Hello", temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"


def test_completion_stream_joins_to_non_stream_text(sdk: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=12, temperature=0.8, seed=11)
    full = sdk.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(sdk.completions.create(**kw, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_prompt_forms_and_indexes(sdk: openai.OpenAI, server: LiveServer) -> None:
    ids = _tokens(server, "Hello world")
    single_ids = sdk.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=3, temperature=0)
    single_str = sdk.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=3, temperature=0)
    assert single_ids.choices[0].text == single_str.choices[0].text
    r = sdk.completions.create(
        model=MODEL_NAME,
        prompt=[ids, [5, 6, 7]],
        max_tokens=3,
        n=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == single_ids.choices[0].text  # greedy: every sample of prompt 0 agrees
    assert r.usage.prompt_tokens == len(ids) + 3
    assert r.usage.completion_tokens == 4 * 3
    r = sdk.completions.create(
        model=MODEL_NAME, prompt=["Hello", "Return the sum"], max_tokens=2, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1]


def test_completion_echo_and_logprobs(sdk: openai.OpenAI, server: LiveServer) -> None:
    r = sdk.completions.create(
        model=MODEL_NAME,
        prompt="Hello world",
        max_tokens=4,
        logprobs=3,
        echo=True,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    c = r.choices[0]
    assert c.text.startswith("Hello world")
    lp = c.logprobs
    n_prompt = len(_tokens(server, "Hello world"))
    assert len(lp.tokens) == n_prompt + 4
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    for logprob, top in zip(lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:], strict=True):
        assert logprob is not None and logprob <= 0
        assert 3 <= len(top) <= 4
        # greedy: the sampled token is the most likely one
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)


def test_chat_non_stream_and_stream(sdk: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    r = sdk.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=8, seed=3, temperature=0.7)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    stream = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=msgs,
        max_tokens=8,
        seed=3,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    content = [c for c in chunks[1:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in content) == text
    assert content[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_chat_default_max_tokens_is_the_rest_of_the_context(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 128
    assert r.choices[0].finish_reason == "length"


def test_chat_content_parts_and_max_completion_tokens(sdk: openai.OpenAI, server: LiveServer) -> None:
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]
    r = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": parts}],
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3
    expected = server.engine.tokenizer.encode(
        "<|im_start|>user\nSay\nhello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    assert r.usage.prompt_tokens == len(expected)


def test_chat_n_and_logprobs(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hi"}],
        n=3,
        max_tokens=4,
        seed=5,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 12
    for c in r.choices:
        content = c.logprobs.content
        assert len(content) == 4
        for tok in content:
            assert tok.logprob <= 0
            assert len(tok.top_logprobs) == 2
            assert tok.bytes == list(tok.token.encode())
            assert tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob


def test_async_sdk_concurrent_streams(async_sdk: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> tuple[str, str]:
        kw = dict(model=MODEL_NAME, prompt=f"Hello {i}", max_tokens=6, temperature=1.0, seed=i)
        full = (await async_sdk.completions.create(**kw, extra_body={"ignore_eos": True})).choices[0].text
        parts = []
        async for chunk in await async_sdk.completions.create(
            **kw, stream=True, extra_body={"ignore_eos": True}
        ):
            parts.extend(c.text for c in chunk.choices)
        return full, "".join(parts)

    async def main() -> list[tuple[str, str]]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), timeout=60)

    for full, streamed in asyncio.run(main()):
        assert full == streamed


def test_async_chat_stream_n(async_sdk: openai.AsyncOpenAI) -> None:
    roles, finishes, text = {}, {}, {0: "", 1: ""}

    async def main() -> None:
        stream = await async_sdk.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "hi"}],
            n=2,
            max_tokens=5,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            for c in chunk.choices:
                if c.delta.role:
                    roles[c.index] = c.delta.role
                text[c.index] += c.delta.content or ""
                if c.finish_reason:
                    assert c.index not in finishes
                    finishes[c.index] = c.finish_reason

    asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert roles == {0: "assistant", 1: "assistant"}
    assert finishes == {0: "length", 1: "length"}


def test_unknown_model_is_404(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.completions.create(model="gpt-4", prompt="hi")
    assert exc.value.body["code"] == "model_not_found"
    assert exc.value.body["param"] == "model"


def test_version_and_health(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/version").json()["version"]
