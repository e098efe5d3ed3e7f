"""SSE framing on the wire, read with raw httpx: `data: {json}\\n\\n` frames, role first, finish_reason
on the last content chunk, the usage chunk, `data: [DONE]`, keep-alive comments while queued.
"""

from __future__ import annotations

import json
import time

import httpx

from tests.app.conftest import MODEL_NAME, LiveServer, wait_until


def _frames(body: str) -> list[str]:
    assert body.endswith("\n\n"), repr(body[-20:])
    frames = body[:-2].split("\n\n")
    for f in frames:
        assert f.startswith("data: ") or f.startswith(": "), repr(f)
        assert "\n" not in f, repr(f)  # one line per frame: JSON never spans lines
    return frames


def _data(frames: list[str]) -> list[dict | str]:
    out: list[dict | str] = []
    for f in frames:
        if f.startswith("data: "):
            payload = f[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_chat_stream_framing(client: httpx.Client) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-request-id"].startswith("chatcmpl-")
        text = r.read().decode()
    events = _data(_frames(text))
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 6
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]
    first = chunks[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks:
        assert set(c) >= {"id", "object", "created", "model", "choices"}
        assert c["object"] == "chat.completion.chunk" and c["model"] == MODEL_NAME
        assert c["id"] == first["id"] and "usage" not in c
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])


def test_completion_stream_framing_without_usage(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        text = r.read().decode()
    events = _data(_frames(text))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_keep_alive_comments_while_queued(fake_server: LiveServer) -> None:
    """A request held in the queue gets `: ping` comments until it runs; then it streams normally."""
    fake_server.engine.pause()
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3, "stream": True}
    frames: list[str] = []
    with httpx.Client(base_url=fake_server.base_url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            buf = ""
            resumed = False
            for piece in r.iter_text():
                buf += piece
                while "\n\n" in buf:
                    frame, buf = buf.split("\n\n", 1)
                    frames.append(frame)
                    if frame.startswith(": ping") and not resumed:
                        resumed = True
                        assert not any(f.startswith("data: ") for f in frames)  # nothing ran yet
                        fake_server.engine.resume()
    assert resumed
    events = _data(frames)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_stream_disconnect_aborts_at_once(fake_server: LiveServer) -> None:
    """Closing the connection mid-stream aborts the request: nothing left running or holding KV."""
    engine = fake_server.engine
    engine.step_delay = 0.01
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 100, "stream": True}
    with httpx.Client(base_url=fake_server.base_url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            # An explicit iterator: breaking out of `for line in r.iter_lines()` would close the response.
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            assert engine.stats().num_running == 1
    assert wait_until(lambda: engine.stats().num_running == 0, timeout=5)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    assert len(engine._running) == 0


def test_no_keep_alive_comments_while_tokens_flow(fake_server: LiveServer) -> None:
    """Pings are for idle streams: with an event every 10 ms and sse_keepalive 0.1 s, none is sent."""
    fake_server.engine.step_delay = 0.01
    body = {
        "model": MODEL_NAME,
        "prompt": "Hello",
        "max_tokens": 60,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.Client(base_url=fake_server.base_url, timeout=30) as c:
        t0 = time.monotonic()
        r = c.post("/v1/completions", json=body)
        elapsed = time.monotonic() - t0
    assert r.status_code == 200
    frames = _frames(r.text)
    assert elapsed > 0.3  # several keep-alive intervals passed while it streamed
    assert not [f for f in frames if f.startswith(":")]
    events = _data(frames)
    # (A token that ends inside a UTF-8 character adds no text and so no chunk: count tokens by usage.)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 60


def test_chunk_frame_is_the_encoded_chunk() -> None:
    """ChunkFrame's pre-encoded head and tail give the bytes of encoding the whole chunk, whatever the
    model name holds (quotes, the `"choices":[]` marker itself, non-ASCII)."""
    from app.protocol import (
        ChatCompletionChunk,
        ChatStreamChoice,
        CompletionChoice,
        CompletionResponse,
        DeltaMessage,
    )
    from app.sse import ChunkFrame, sse

    for model in ("m", 'odd "choices":[] name', "caf\u00e9 \u2603"):
        comp = CompletionChoice(index=3, text='a "q"\n\u00e9', finish_reason="length", stop_reason=7)
        frame = ChunkFrame(CompletionResponse(id="cmpl-1", created=5, model=model, choices=[]))
        assert frame(comp) == sse(CompletionResponse(id="cmpl-1", created=5, model=model, choices=[comp]))
        chat = ChatStreamChoice(index=0, delta=DeltaMessage(content="x"))
        frame = ChunkFrame(ChatCompletionChunk(id="chatcmpl-1", created=5, model=model, choices=[]))
        assert frame(chat) == sse(
            ChatCompletionChunk(id="chatcmpl-1", created=5, model=model, choices=[chat])
        )


def test_streams_ask_the_engine_for_deltas(fake_server: LiveServer, monkeypatch) -> None:
    """Every generation request asks for per-step deltas (no cumulative copies per token); the fake,
    like the engine, then leaves the whole sequence off running outputs, so the text streamed is the
    text collected only if the app reads the deltas."""
    engine = fake_server.engine
    kinds = []
    real_add = engine.add_request

    async def recording_add(request_id, prompt, ids, params, priority=0, lora_request=None):
        kinds.append(params.output_kind)
        return await real_add(request_id, prompt, ids, params, priority, lora_request)

    monkeypatch.setattr(engine, "add_request", recording_add)
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 12, "seed": 3, "logprobs": 2}
    with httpx.Client(base_url=fake_server.base_url, timeout=30) as c:
        whole = c.post("/v1/completions", json=body).json()["choices"][0]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert kinds == ["delta", "delta"]
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    assert sum((e["choices"][0]["logprobs"]["tokens"] for e in events), []) == whole["logprobs"]["tokens"]
