"""The per-step messages between the engine and its tensor-parallel ranks as msgpack (msgspec), not
pickle: a step's `launch` (its SchedulerOutput) and `collect` going out, rank 0's ModelRunnerOutput
coming back. Rare control calls (start-up, adapters, shutdown) stay pickled; every frame starts with
one byte saying which it is, so the same pipe can carry both.

The encoder's thread is the engine's, so what it does per running request is what counts: a running
request's CachedRequestData goes as an array of its fields (one C-level attrgetter each, about half
the bytes and a third of the time of msgspec's map per dataclass), the SchedulerOutput itself as an
array too; new requests (a few per step) as msgspec's maps of NewRequestData and SamplingParams. The
field lists come from the dataclasses, so a field added to them travels without touching this file.

Decoding builds the very dataclasses the worker uses. SchedulerOutput, NewRequestData and
SamplingParams are decoded into wire mirrors and copied into the real class without its
`__post_init__`: SamplingParams' must not run again, it would validate again and reset
`all_stop_token_ids`, which the input processor extended with the EOS ids after construction.
LoRARequest and the output types are decoded straight into their dataclasses.
"""

from __future__ import annotations

import dataclasses
import pickle
import typing
from operator import attrgetter
from typing import Any

import msgspec

from engine.core.sampling_params import SamplingParams
from engine.core.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)

# The first byte of every frame.
STEP = b"S"  # msgpack of a step message (launch / collect) or of a collect's reply
PICKLE = b"P"  # pickle of a control call or reply

_LAUNCH, _COLLECT = 1, 2  # the messages' tags (first array element)


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _mirror(cls: type, overrides: dict[str, Any], array_like: bool) -> type[msgspec.Struct]:
    """A msgspec Struct with `cls`'s field names, order and types (`overrides` replaces some), every
    field required: the encoder writes every field."""
    hints = typing.get_type_hints(cls)
    fields = [(name, overrides.get(name, hints[name])) for name in _names(cls)]
    return msgspec.defstruct(f"Wire{cls.__name__}", fields, array_like=array_like, gc=False)


_CACHED_FIELDS = _names(CachedRequestData)
_cached_values = attrgetter(*_CACHED_FIELDS)  # CachedRequestData -> tuple in field order
_CachedTuple = tuple.__class_getitem__(
    tuple(typing.get_type_hints(CachedRequestData)[n] for n in _CACHED_FIELDS)
)
_SO_FIELDS = _names(SchedulerOutput)
_so_values = attrgetter(*_SO_FIELDS)
_SO_CACHED = _SO_FIELDS.index("cached_requests")

_WireSamplingParams = _mirror(SamplingParams, {}, array_like=False)
_WireNewRequest = _mirror(NewRequestData, {"sampling_params": _WireSamplingParams}, array_like=False)
_WireSchedulerOutput = _mirror(
    SchedulerOutput,
    {"new_requests": list[_WireNewRequest], "cached_requests": list[_CachedTuple]},  # type: ignore[valid-type]
    array_like=True,
)


class _Launch(msgspec.Struct, array_like=True, tag=_LAUNCH, gc=False):
    step_id: int
    previous: int | None
    scheduler_output: _WireSchedulerOutput  # type: ignore[valid-type]


class _Collect(msgspec.Struct, array_like=True, tag=_COLLECT, gc=False):
    step_id: int


_encoder = msgspec.msgpack.Encoder()
_step_decoder = msgspec.msgpack.Decoder(_Launch | _Collect)
_reply_decoder = msgspec.msgpack.Decoder(ModelRunnerOutput | None)


def _copy_into(cls: type, wire: Any) -> Any:
    """An instance of the slotted dataclass `cls` with `wire`'s field values, `__post_init__` not run
    (the engine's side validated and derived them)."""
    obj = cls.__new__(cls)
    for name in wire.__struct_fields__:
        setattr(obj, name, getattr(wire, name))
    return obj


def _scheduler_output(wire: Any) -> SchedulerOutput:
    so = _copy_into(SchedulerOutput, wire)
    so.cached_requests = [CachedRequestData(*values) for values in wire.cached_requests]
    new = []
    for w in wire.new_requests:
        request = _copy_into(NewRequestData, w)
        request.sampling_params = _copy_into(SamplingParams, w.sampling_params)
        new.append(request)
    so.new_requests = new
    return so


# ---------------------------------------------------------------- engine -> ranks


def encode_launch(step_id: int, scheduler_output: SchedulerOutput, previous: int | None) -> bytearray:
    values = list(_so_values(scheduler_output))
    values[_SO_CACHED] = list(map(_cached_values, scheduler_output.cached_requests))
    buf = bytearray(STEP)
    _encoder.encode_into((_LAUNCH, step_id, previous, values), buf, 1)
    return buf


def encode_collect(step_id: int) -> bytearray:
    buf = bytearray(STEP)
    _encoder.encode_into((_COLLECT, step_id), buf, 1)
    return buf


def encode_control(method: str, args: tuple) -> bytes:
    return PICKLE + pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)


def decode_call(frame: bytes | bytearray | memoryview) -> tuple[str, tuple]:
    """A frame from the engine as the worker's `(method, args)`."""
    view = memoryview(frame)
    kind = bytes(view[:1])
    if kind == PICKLE:
        return pickle.loads(view[1:])
    if kind != STEP:
        raise ValueError(f"unknown frame kind {kind!r}")
    message = _step_decoder.decode(view[1:])
    if isinstance(message, _Collect):
        return "collect", (message.step_id,)
    return "launch", (message.step_id, _scheduler_output(message.scheduler_output), message.previous)


# ---------------------------------------------------------------- ranks -> engine


def encode_step_reply(output: ModelRunnerOutput | None) -> bytearray:
    """A successful collect's reply: rank 0's output, None from the other ranks."""
    buf = bytearray(STEP)
    _encoder.encode_into(output, buf, 1)
    return buf


def encode_reply(reply: tuple) -> bytes:
    """Any other reply, `(status, value)`."""
    return PICKLE + pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)


def decode_reply(frame: bytes | bytearray | memoryview) -> tuple[str, Any]:
    view = memoryview(frame)
    kind = bytes(view[:1])
    if kind == STEP:
        return "ok", _reply_decoder.decode(view[1:])
    if kind != PICKLE:
        raise ValueError(f"unknown frame kind {kind!r}")
    return pickle.loads(view[1:])
