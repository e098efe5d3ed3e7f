"""The HTTP layer's engine client (engine/protocol.py) is what both the real AsyncEngine and the
test fake implement: every member exists, with the same parameters, the same kind (coroutine, async
generator, plain method, property) and an instance attribute of the declared type. The fake cannot
drift from the engine, nor the app from either."""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Any

from engine.async_engine import AsyncEngine
from engine.protocol import EngineClient, EngineStats
from tests.app.conftest import LiveServer
from tests.app.fake_engine import FakeEngine


def _declared(proto: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(methods and properties, data attributes with their types) the protocol declares."""
    members = {
        name: value
        for name, value in vars(proto).items()
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
    }
    hints = typing.get_type_hints(proto)
    return members, {name: hint for name, hint in hints.items() if name not in members}


def _defined_in(cls: type, name: str) -> Any:
    """The member as the implementing class defines it, not as inherited from the protocol."""
    for klass in cls.__mro__:
        if klass is EngineClient or klass is typing.Protocol or klass is typing.Generic:
            continue
        if name in vars(klass):
            return vars(klass)[name]
    return None


def _kind(fn: Any) -> str:
    if inspect.isasyncgenfunction(fn):
        return "async generator"
    if inspect.iscoroutinefunction(fn):
        return "coroutine"
    return "function"


def _is_instance(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, arg) for arg in typing.get_args(hint))
    if hint is None or hint is type(None):
        return value is None
    return isinstance(value, origin or hint)


def protocol_mismatches(cls: type, instance: Any) -> list[str]:
    methods, attributes = _declared(EngineClient)
    problems = []
    for name, declared in methods.items():
        impl = _defined_in(cls, name)
        if impl is None:
            problems.append(f"{name}: missing")
            continue
        if isinstance(declared, property):
            if not isinstance(impl, property):
                problems.append(f"{name}: a property in the protocol, a {type(impl).__name__} here")
            continue
        if not inspect.isfunction(impl):
            problems.append(f"{name}: not a method")
            continue
        # A protocol method returning an AsyncIterator is an async generator (`async def ... yield`).
        want = _kind(declared)
        if want == "function" and "AsyncIterator" in str(declared.__annotations__.get("return")):
            want = "async generator"
        if _kind(impl) != want:
            problems.append(f"{name}: {want} in the protocol, {_kind(impl)} here")
        expected = list(inspect.signature(declared).parameters.values())
        actual = list(inspect.signature(impl).parameters.values())
        extra = actual[len(expected) :]
        for p in extra:
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                problems.append(f"{name}: extra required parameter {p.name!r}")
        for want_p, got_p in zip(expected, actual, strict=False):
            if (want_p.name, want_p.kind) != (got_p.name, got_p.kind):
                problems.append(f"{name}: parameter {got_p.name!r} where the protocol has {want_p.name!r}")
            elif want_p.annotation != got_p.annotation:
                problems.append(f"{name}({want_p.name}): {got_p.annotation} instead of {want_p.annotation}")
            elif (want_p.default is inspect.Parameter.empty) != (got_p.default is inspect.Parameter.empty):
                problems.append(f"{name}({want_p.name}): default differs")
        if len(actual) < len(expected):
            problems.append(f"{name}: missing parameters {[p.name for p in expected[len(actual) :]]}")
        if declared.__annotations__.get("return") != impl.__annotations__.get("return"):
            problems.append(f"{name}: returns {impl.__annotations__.get('return')}")
    for name, hint in attributes.items():
        if not hasattr(instance, name):
            problems.append(f"{name}: no such attribute")
        elif not _is_instance(getattr(instance, name), hint):
            problems.append(f"{name}: {type(getattr(instance, name)).__name__}, not {hint}")
    for name in ("is_healthy", "is_draining"):
        if hasattr(instance, name) and not isinstance(getattr(instance, name), bool):
            problems.append(f"{name}: not a bool")
    return problems


def test_fake_engine_implements_the_protocol(tiny_tokenizer_dir: Path) -> None:
    fake = FakeEngine(tiny_tokenizer_dir)
    assert EngineClient in FakeEngine.__mro__  # declared, not only shaped alike
    assert protocol_mismatches(FakeEngine, fake) == []
    assert isinstance(fake.stats(), EngineStats)


def test_profile_serving_fake_engine_implements_the_protocol(tiny_tokenizer_dir: Path) -> None:
    from loadtest.profile_serving import FastFakeEngine  # loadtest/profile_serving.py's cheap step loop

    fake = FastFakeEngine(str(tiny_tokenizer_dir), max_num_seqs=4, step_s=0.0, max_model_len=128)
    assert protocol_mismatches(FastFakeEngine, fake) == []


def test_async_engine_implements_the_protocol(server: LiveServer) -> None:
    engine = server.engine
    assert type(engine) is AsyncEngine
    assert protocol_mismatches(AsyncEngine, engine) == []
    stats = engine.stats()
    assert isinstance(stats, EngineStats) and stats.step_loop is not None


def test_the_check_catches_drift(tiny_tokenizer_dir: Path) -> None:
    class Drifted(FakeEngine):
        async def abort(self, req_id: str) -> None:  # renamed parameter
            return None

        def begin_drain(self, force: bool) -> None:  # an extra required parameter
            return None

        async def generate(  # a coroutine, not an async generator
            self, prompt: str | list[int], params: Any, request_id: str, priority: int = 0
        ) -> Any:
            return None

    drifted = Drifted(tiny_tokenizer_dir)
    del drifted.vocab_size
    drifted.max_model_len = "128"  # type: ignore[assignment]
    assert protocol_mismatches(Drifted, drifted) == [
        "generate: async generator in the protocol, coroutine here",
        "generate(params): Any instead of SamplingParams",
        "generate: missing parameters ['lora_request']",
        "generate: returns Any",
        "abort: parameter 'req_id' where the protocol has 'request_id'",
        "begin_drain: extra required parameter 'force'",
        "max_model_len: str, not <class 'int'>",
        "vocab_size: no such attribute",
    ]
