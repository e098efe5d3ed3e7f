"""200 requests cancelled by a client timeout; then a normal request completes promptly and the
engine holds nothing: no running or waiting requests, KV-cache usage back to zero.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.app.conftest import MODEL_NAME, LiveServer, wait_until

STORM = 200


def test_disconnect_storm(server: LiveServer, monkeypatch) -> None:
    engine = server.engine
    added = []
    real_add = engine.add_request

    async def counting_add(request_id, *args, **kwargs):
        stream = await real_add(request_id, *args, **kwargs)
        added.append(request_id)
        return stream

    monkeypatch.setattr(engine, "add_request", counting_add)

    async def doomed(c: httpx.AsyncClient, i: int) -> str:
        body = {
            "model": MODEL_NAME,
            "prompt": [5 + i % 50, 6, 7, 8],
            "max_tokens": 100,
            "ignore_eos": True,
            "stream": i % 2 == 0,  # half streamed, half not
        }
        try:
            if body["stream"]:
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_bytes():
                        pass
            else:
                await c.post("/v1/completions", json=body)
        except httpx.TimeoutException:
            return "timeout"
        return "finished"

    async def storm() -> list[str]:
        limits = httpx.Limits(max_connections=STORM + 10, max_keepalive_connections=0)
        # The whole exchange, not each read, is bounded: streamed chunks would keep a read timeout alive.
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=30) as c:

            async def bounded(i: int) -> str:
                try:
                    return await asyncio.wait_for(doomed(c, i), timeout=2.0)
                except asyncio.TimeoutError:
                    return "timeout"

            return await asyncio.gather(*(bounded(i) for i in range(STORM)))

    outcomes = asyncio.run(storm())
    assert outcomes.count("timeout") >= STORM * 0.9, outcomes
    assert len(added) >= STORM * 0.8  # they reached the engine before their clients gave up

    # Every cancelled request is aborted server-side at once (the step loop only has to notice).
    assert wait_until(lambda: engine.stats().num_running + engine.stats().num_waiting == 0, timeout=15)

    t0 = time.monotonic()
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        )
    assert r.status_code == 200
    assert time.monotonic() - t0 < 5.0
    assert wait_until(lambda: engine.stats().kv_cache_usage == 0.0, timeout=5)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
