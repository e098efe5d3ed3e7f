"""The main function of a tensor-parallel worker process (spawned by MultiprocExecutor).

The process reads calls, one `(method, args)` per message (engine/executor/step_codec.py: a step's
msgpack, a control call's pickle), in the order of the engine's shared-memory ring
(engine/executor/shm_broadcast.py) and runs them on its Worker (engine/worker/worker.py): a step's
`launch` and `collect` are in the ring's slot; a control call (load, profile, adapters, shutdown) or a
step too large for a slot is a marker there, and its bytes are the next message on the pipe. Replies
go back on the pipe. `launch` answers nothing (the step's errors come back at its `collect`); a
collect answers its output (msgpack); every other call answers `("ok", result)` or `("error", text)`,
or for an adapter the caller got wrong, `("invalid", the exception as data)` (pickled). An idle worker sleeps on its
semaphore of the ring. It ends on "shutdown", on the pipe's end (the engine process is gone) or when
its parent is no longer its parent (checked every few seconds while idle), so a killed server leaves no
worker behind.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

from engine.config import ResolvedConfig
from engine.errors import InvalidRequestError
from engine.executor.shm_broadcast import BroadcastReader, ChannelHandle, ChannelTimeout
from engine.executor.step_codec import decode_call, encode_reply, encode_step_reply

# How often an idle worker checks that the engine process is still there.
_PARENT_CHECK_S = 2.0
_NO_REPLY = frozenset({"launch"})
# The calls of every step: sent in the ring's slots (the others travel on the pipe).
STEP_CALLS = frozenset({"launch", "collect"})
# Calls whose InvalidRequestError is the caller's (no collective ran): re-raised in the engine.
REQUEST_CALLS = frozenset({"add_lora", "remove_lora"})


def exception_state(exc: BaseException) -> tuple[str, str, tuple, dict]:
    """An exception as plain data (the engine's errors take keyword-less constructors that plain
    pickling cannot call back): module, class name, args and attributes."""
    cls = type(exc)
    return cls.__module__, cls.__qualname__, exc.args, dict(vars(exc))


def rebuild_exception(state: tuple[str, str, tuple, dict]) -> BaseException:
    module, name, args, attrs = state
    cls = getattr(importlib.import_module(module), name)
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(attrs)
    return exc


def worker_main(
    config: ResolvedConfig,
    rank: int,
    device_index: int | None,
    init_method: str,
    timeout_s: float,
    conn: Connection,
    channel: ChannelHandle,
    log_level: int,
) -> None:
    # Ctrl-C reaches the whole process group; the engine process decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(asctime)s weir-tp{rank} %(levelname)s %(message)s")
    parent = os.getppid()
    try:
        reader = BroadcastReader(channel, rank)
    except BaseException:  # noqa: BLE001 - reported to the engine, which refuses to start
        _send(conn, ("error", traceback.format_exc()))
        return
    try:
        from engine.worker.worker import Worker, init_distributed  # noqa: PLC0415 (imports torch)

        init_distributed(config, rank, device_index, init_method, timeout_s)
        worker: Any = Worker(config, rank, device_index)
    except BaseException:  # noqa: BLE001 - reported to the engine, which refuses to start
        _send(conn, ("error", traceback.format_exc()))
        reader.close()
        return
    _send(conn, ("ok", None))
    try:
        _serve(worker, reader, conn, parent)
    finally:
        worker.shutdown()
        reader.close()


def next_message(reader: BroadcastReader, conn: Connection, parent: int) -> bytes | None:
    """The next call's bytes, from the ring or (if the ring says so) the pipe; None once the engine
    is gone."""
    try:
        while True:
            try:
                data = reader.read(_PARENT_CHECK_S)
                break
            except ChannelTimeout:
                if os.getppid() != parent:
                    return None  # the engine process died; our parent is now init
        if data is not None:
            return data
        while not conn.poll(_PARENT_CHECK_S):
            if os.getppid() != parent:
                return None
        return conn.recv_bytes()
    except (EOFError, OSError):
        return None


def _serve(worker: Any, reader: BroadcastReader, conn: Connection, parent: int) -> None:
    while True:
        message = next_message(reader, conn, parent)
        if message is None:
            return
        method, args = decode_call(message)
        if method == "shutdown":
            _send(conn, ("ok", None))
            return
        try:
            result = getattr(worker, method)(*args)
        except InvalidRequestError as exc:
            if method not in REQUEST_CALLS:
                _send(conn, ("error", traceback.format_exc()))
            else:  # the caller's fault (a bad adapter), the same on every rank: raised to the caller
                _send(conn, ("invalid", exception_state(exc)))
            continue
        except Exception:  # noqa: BLE001 - the engine decides (any worker error is fatal there)
            _send(conn, ("error", traceback.format_exc()))
            continue
        if method == "collect":
            try:
                frame = encode_step_reply(result)
            except Exception:  # noqa: BLE001 - an output msgpack cannot carry: the engine's error
                _send(conn, ("error", traceback.format_exc()))
                continue
            _send_frame(conn, frame)
        elif method not in _NO_REPLY:
            _send(conn, ("ok", result))


def _send(conn: Connection, reply: tuple) -> None:
    _send_frame(conn, encode_reply(reply))


def _send_frame(conn: Connection, frame: bytes | bytearray) -> None:
    try:
        conn.send_bytes(frame)
    except (BrokenPipeError, OSError):
        pass  # the engine is gone; the loop ends at its next read
