"""Engines release what they hold: dropping the last reference frees the runner, the model and the
KV cache by reference counting alone (no cycle waits for a garbage collection, so the next engine
built in the process finds the memory free), and shutdown() frees them at once."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.errors import EngineShutdownError

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
OPTIONS = {"device": "cpu", "dtype": "float32", "max_model_len": 128, "num_kv_blocks": 32}


@pytest.fixture()
def no_gc() -> Iterator[None]:
    """Only reference counting frees anything inside the test."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _device_refs(llm_engine: object) -> dict[str, weakref.ref]:
    runner = llm_engine.executor.runner  # type: ignore[attr-defined]
    k_cache, v_cache = runner.kv_caches[0]
    refs = {
        "engine": weakref.ref(llm_engine),
        "runner": weakref.ref(runner),
        "model": weakref.ref(runner.model),
        "weight": weakref.ref(next(runner.model.parameters())),
        "k_cache": weakref.ref(k_cache),
        "v_cache": weakref.ref(v_cache),
    }
    if runner.graph_runner is not None:
        refs["graph_runner"] = weakref.ref(runner.graph_runner)
        refs["graph_input_buffer"] = weakref.ref(runner.graph_runner.input_buffer)
    return refs


def _alive(refs: dict[str, weakref.ref]) -> list[str]:
    return [name for name, ref in refs.items() if ref() is not None]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "emulated-graphs"])
def test_dropping_the_llm_frees_the_device_state_without_gc(
    tiny_llama_dir: Path, no_gc: None, graphs: bool
) -> None:
    llm = LLM(str(tiny_llama_dir), **OPTIONS)
    if graphs:  # the CUDA-graph runner's path (static buffer, captured closures), on CPU
        llm.llm_engine.executor.runner.capture_cuda_graphs(emulate=True)
    # A generation first: steps in flight, per-request state, n > 1 children, all run and finish.
    out = llm.generate(
        [[5, 6, 7], [8, 9]], [GREEDY, SamplingParams(n=2, max_tokens=3, seed=1)], use_tqdm=False
    )
    assert [len(o.outputs) for o in out] == [1, 2]
    refs = _device_refs(llm.llm_engine)
    assert _alive(refs) == list(refs)
    del llm
    assert _alive(refs) == []


def test_dropping_an_engine_that_never_generated_frees_it(tiny_llama_dir: Path, no_gc: None) -> None:
    llm = LLM(str(tiny_llama_dir), **OPTIONS)
    refs = _device_refs(llm.llm_engine)
    del llm
    assert _alive(refs) == []


def test_shutdown_frees_at_once_and_generate_then_raises(tiny_llama_dir: Path, no_gc: None) -> None:
    llm = LLM(str(tiny_llama_dir), **OPTIONS)
    expected = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    refs = _device_refs(llm.llm_engine)
    del refs["engine"], refs["runner"]  # still referenced by `llm`; what they held on the device is not
    llm.shutdown()
    assert _alive(refs) == []  # while `llm` itself is still referenced
    with pytest.raises(EngineShutdownError, match="the engine was shut down; build a new one to generate"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    llm.shutdown()  # idempotent
    assert llm.llm_engine.stats().num_running == 0
    assert not llm.llm_engine.has_unfinished_requests()

    with LLM(str(tiny_llama_dir), **OPTIONS) as second:
        assert second.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected
        refs = _device_refs(second.llm_engine)
    assert _alive(refs) == ["engine", "runner"]  # `second` is still a name here; its device state is gone
    with pytest.raises(EngineShutdownError):
        second.generate("hello", GREEDY, use_tqdm=False)


async def _generate(engine: AsyncEngine, request_id: str) -> list[int]:
    final = None
    async for out in engine.generate([5, 6, 7], GREEDY, request_id):
        final = out
    assert final is not None and final.finished
    return final.outputs[0].token_ids


def test_async_engine_shutdown_releases_the_device(tiny_llama_dir: Path, no_gc: None) -> None:
    async def run() -> list[int]:
        async with AsyncEngine(EngineConfig(model=str(tiny_llama_dir), **OPTIONS)) as engine:
            refs = _device_refs(engine.engine)
            del refs["engine"], refs["runner"]
            loop_task = engine._loop_task
            workers = list(engine._executor._threads)
            token_ids = await _generate(engine, "r1")
            assert loop_task is not None and not loop_task.done() and len(workers) == 1
        # Leaving the block shut it down, while `engine` is still a name here.
        assert _alive(refs) == [] and not engine.is_healthy and engine.is_draining
        assert loop_task.cancelled()
        assert not workers[0].is_alive()
        assert engine.stats().num_running == 0
        return token_ids

    assert len(asyncio.run(run())) == 6


def test_dropping_a_started_async_engine_frees_the_device_without_gc(
    tiny_llama_dir: Path, no_gc: None
) -> None:
    """No shutdown(): the last reference goes and the step loop, parked waiting for work, lets go of
    the engine, notices it is gone and ends; the worker thread ends with it."""

    async def run() -> list[int]:
        engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), **OPTIONS))
        await engine.start()
        token_ids = await _generate(engine, "r1")
        refs = _device_refs(engine.engine)
        refs["async_engine"] = weakref.ref(engine)
        loop_task = engine._loop_task
        workers = list(engine._executor._threads)
        assert loop_task is not None and len(workers) == 1 and _alive(refs) == list(refs)
        del engine
        # The loop may still be draining the step launched after the last token; it ends on its own
        # once the engine is gone (awaiting it is the event). The worker thread ends with it, and may
        # hold its last work item (a step of the engine) for a moment after that item's result woke
        # the loop (ThreadPoolExecutor drops it after setting the result): once the thread has ended
        # (joining it is the event), everything is freed.
        await asyncio.wait_for(asyncio.shield(loop_task), timeout=10)
        assert loop_task.result() is None
        workers[0].join(timeout=10)
        assert not workers[0].is_alive()
        assert _alive(refs) == []
        return token_ids

    assert len(asyncio.run(run())) == 6
