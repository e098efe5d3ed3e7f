"""AsyncEngine: streams, cancellation frees blocks, queue bound, drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import AsyncEngine, EngineConfig, SamplingParams
from engine.errors import EngineDrainingError, QueueFullError


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


@pytest.fixture(scope="module")
def config(tiny_llama_dir: Path) -> EngineConfig:
    return EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=128)


def test_stream_deltas_join_to_final_text(config: EngineConfig) -> None:
    async def main() -> None:
        engine = AsyncEngine(config)
        await engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        deltas, final = [], None
        async for out in engine.generate("Return the", params, "r1"):
            deltas.append(out.outputs[0].text_delta)
            final = out
        assert final is not None and final.finished
        assert "".join(deltas) == final.outputs[0].text
        assert len(final.outputs[0].token_ids) == 16
        await engine.shutdown(timeout=1)

    _run(main())


def test_cancel_aborts_and_frees_blocks(config: EngineConfig) -> None:
    async def main() -> None:
        engine = AsyncEngine(config)
        await engine.start()
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        started = asyncio.Event()

        async def consume(i: int) -> None:
            async for _ in engine.generate([5 + i] * 20, params, f"c{i}"):
                started.set()

        tasks = [asyncio.create_task(consume(i)) for i in range(8)]
        await started.wait()
        assert engine.stats().kv_cache_usage > 0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The next request completes, and afterwards nothing is held.
        outs = [
            o async for o in engine.generate([7, 8], SamplingParams(max_tokens=2, ignore_eos=True), "after")
        ]
        assert outs[-1].finished
        stats = engine.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert stats.kv_cache_usage == 0.0
        await engine.shutdown(timeout=1)

    _run(main())


def test_queue_bound_and_drain(config: EngineConfig) -> None:
    async def main() -> None:
        cfg = EngineConfig(
            **{**{f: getattr(config, f) for f in EngineConfig.field_names()}, "max_waiting_tokens": 30}
        )
        engine = AsyncEngine(cfg)
        await engine.start()
        with pytest.raises(ValueError, match="could never be queued"):  # larger than the queue: 400
            await engine.add_request("big", None, [5] * 31, SamplingParams())
        await engine.add_request("a", None, [5] * 20, SamplingParams())  # no step runs in between
        with pytest.raises(QueueFullError, match="max_waiting_tokens 30"):  # full now: 429
            await engine.add_request("b", None, [5] * 20, SamplingParams())
        engine.begin_drain()
        with pytest.raises(EngineDrainingError):
            await engine.add_request("late", None, [5, 6], SamplingParams())
        await engine.shutdown(timeout=0)

    _run(main())


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_concurrent_streams_match_offline_greedy(config: EngineConfig, async_scheduling: bool) -> None:
    """Streams served by the step loop (either scheduling mode) carry exactly the offline tokens."""
    from engine import LLM

    prompts = [[5 + i] * (3 + 4 * i) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    offline = LLM(config.model, device="cpu", dtype="float32", max_model_len=128)
    expected = [o.outputs[0].token_ids for o in offline.generate(prompts, params, use_tqdm=False)]

    async def main() -> None:
        cfg = EngineConfig(
            **{
                **{f: getattr(config, f) for f in EngineConfig.field_names()},
                "async_scheduling": async_scheduling,
            }
        )
        engine = AsyncEngine(cfg)
        await engine.start()

        async def one(i: int) -> list[int]:
            ids: list[int] = []
            async for out in engine.generate(prompts[i], params, f"s{i}"):
                ids += out.outputs[0].token_ids_delta
            return ids

        got = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        assert got == expected
        assert engine.stats().kv_cache_usage == 0.0
        await engine.shutdown(timeout=1)

    _run(main())


def test_failure_surfacing_when_results_arrive(config: EngineConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under async scheduling a device error can first show when a step's results are awaited: the
    requests of that step fail with the message, their blocks are freed, and the engine goes on."""
    from engine.worker.step_in_flight import StepInFlight

    real_result = StepInFlight.result
    calls = {"n": 0}

    def flaky(self: StepInFlight):
        if not self.done:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure while waiting for a step")
        return real_result(self)

    async def main() -> None:
        engine = AsyncEngine(config)
        assert engine.config.scheduler.async_scheduling
        await engine.start()
        monkeypatch.setattr(StepInFlight, "result", flaky)
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        outs = [o async for o in engine.generate([5, 6, 7], params, "doomed")]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "error"
        assert "injected failure while waiting for a step" in (outs[-1].error or "")
        assert engine.is_healthy
        after = [
            o async for o in engine.generate([8, 9], SamplingParams(max_tokens=3, ignore_eos=True), "next")
        ]
        assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 3
        assert engine.stats().kv_cache_usage == 0.0
        await engine.shutdown(timeout=1)

    _run(main())


def test_abort_ends_the_stream_and_frees_blocks(config: EngineConfig) -> None:
    """abort() used to drop the stream without a word: whoever read it waited forever."""

    async def main() -> None:
        engine = AsyncEngine(config)
        await engine.start()
        stream = await engine.add_request(
            "ab", None, [5] * 20, SamplingParams(max_tokens=100, ignore_eos=True)
        )
        first = await stream.__anext__()
        assert not first.finished
        await engine.abort("ab")
        rest = [o async for o in stream]
        assert len(rest) == 1 and rest[0].finished
        assert rest[0].outputs[0].finish_reason == "abort"
        assert not engine.engine.has_unfinished_requests()
        assert engine.stats().kv_cache_usage == 0.0
        await engine.abort("never-added")  # unknown ids are ignored
        for bad, name in ((5, "int"), (None, "NoneType")):  # matched no request: silently no abort
            with pytest.raises(TypeError) as exc:
                await engine.abort(bad)
            assert str(exc.value) == f"request_id must be a str; got {name}"
        await engine.shutdown(timeout=1)

    _run(main())


def test_closing_an_unread_stream_aborts_the_request(config: EngineConfig) -> None:
    """An async generator closed before its first step runs none of its body, so a stream closed
    unread never aborted its request: it ran on to max_tokens, its outputs kept in a channel."""

    async def main() -> None:
        engine = AsyncEngine(config)
        await engine.start()
        stream = await engine.add_request(
            "unread", None, [5] * 20, SamplingParams(max_tokens=100, ignore_eos=True)
        )
        await stream.aclose()
        assert not engine.engine.has_unfinished_requests()
        assert engine._streams == {}
        assert engine.stats().kv_cache_usage == 0.0
        # A stream read to its end, closed afterwards, leaves a later request of the same id alone.
        done = await engine.add_request("again", None, [5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
        assert [o async for o in done][-1].finished
        live = await engine.add_request("again", None, [5, 6], SamplingParams(max_tokens=3, ignore_eos=True))
        await done.aclose()
        outs = [o async for o in live]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
        await engine.shutdown(timeout=1)

    _run(main())


def test_requests_before_start_and_after_shutdown_are_refused(config: EngineConfig) -> None:
    """Before start() nothing steps: a request was queued and its stream waited forever. After
    shutdown() the refusal said "the engine has stopped: None"."""
    from engine.errors import EngineShutdownError, InvalidRequestError

    async def main() -> None:
        engine = AsyncEngine(config)
        with pytest.raises(RuntimeError, match=r"^the AsyncEngine is not started: await engine.start\(\)"):
            await engine.add_request("early", None, [5, 6], SamplingParams(max_tokens=2))
        assert not engine.engine.has_unfinished_requests()
        await engine.start()
        with pytest.raises(InvalidRequestError, match=r"^priority must be an integer; got 'x'$"):
            await engine.add_request("p", None, [5, 6], SamplingParams(max_tokens=2), priority="x")
        with pytest.raises(
            InvalidRequestError, match=r"^sampling_params must be a SamplingParams; got dict$"
        ):
            await engine.add_request("p", None, [5, 6], {"max_tokens": 2})
        outs = [o async for o in engine.generate([5, 6], SamplingParams(max_tokens=2, ignore_eos=True), "ok")]
        assert outs[-1].finished and engine.is_healthy
        await engine.shutdown(timeout=1)
        with pytest.raises(
            EngineShutdownError, match=r"^the engine was shut down; build a new one to generate$"
        ):
            await engine.add_request("late", None, [5, 6], SamplingParams(max_tokens=2))

    _run(main())
