"""The shared-memory broadcast ring of the tensor-parallel executor (engine/executor/shm_broadcast.py):
every reader gets every message in order across many wrap-arounds, the writer waits for (and never
overwrites) a lagging reader's slot, a message larger than a slot keeps its place as a marker, a
reader times out when the writer is gone, and the segment and semaphores are unlinked on close and
after the writer's process is killed."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from engine.executor.shm_broadcast import (
    BroadcastReader,
    BroadcastWriter,
    ChannelHandle,
    ChannelTimeout,
    ReaderGoneError,
)
from engine.executor.worker_process import next_message
from tests.process_state import pid_alive

REPO = Path(__file__).resolve().parents[2]
SPAWN = multiprocessing.get_context("spawn")


def _shm_files(writer: BroadcastWriter) -> list[Path]:
    """The files in /dev/shm behind the writer's segment and semaphores (that exist now)."""
    names = [writer.name, *("sem." + n.lstrip("/") for n in writer.semaphore_names)]
    return [p for p in (Path("/dev/shm") / n for n in names) if p.exists()]


def test_every_reader_gets_every_message_in_order_across_wrap_arounds() -> None:
    writer = BroadcastWriter(num_readers=3, num_slots=3, slot_bytes=64)
    readers = [BroadcastReader(writer.handle, r) for r in range(3)]
    messages = [bytes([i]) * (i % 65) for i in range(40)]  # lengths 0..64, 13 times round the ring
    got: list[list[bytes | None]] = [[], [], []]
    for i, message in enumerate(messages):
        assert writer.write(message, timeout_s=5.0) is True
        # Reader 0 keeps up, readers 1 and 2 read in bursts of three (as many as there are slots).
        got[0].append(readers[0].read(1.0))
        if i % 3 == 2:
            for r in (1, 2):
                got[r].extend(readers[r].read(1.0) for _ in range(3))
    for r in (1, 2):
        got[r].append(readers[r].read(1.0))
    assert got == [messages, messages, messages]
    for reader in readers:
        reader.close()
    writer.close()


def test_writer_waits_for_a_lagging_reader_and_never_overwrites_its_slot() -> None:
    writer = BroadcastWriter(num_readers=2, num_slots=2, slot_bytes=8)
    fast, slow = (BroadcastReader(writer.handle, r) for r in range(2))
    writer.write(b"one", 5.0)
    writer.write(b"two", 5.0)
    assert (fast.read(1.0), fast.read(1.0)) == (b"one", b"two")
    written = threading.Event()
    thread = threading.Thread(target=lambda: (writer.write(b"three", 10.0), written.set()))
    thread.start()
    assert not written.wait(0.3), "the writer reused a slot the slow reader had not read"
    assert slow.read(1.0) == b"one"  # intact: the third message waited for its slot
    assert written.wait(5.0)
    thread.join()
    assert (slow.read(1.0), slow.read(1.0), fast.read(1.0)) == (b"two", b"three", b"three")
    writer.close()


def test_a_full_ring_times_out_or_reports_the_dead_reader_and_stays_broken() -> None:
    writer = BroadcastWriter(num_readers=2, num_slots=1, slot_bytes=8)
    reader0 = BroadcastReader(writer.handle, 0)
    writer.write(b"a", 1.0)
    reader0.read(1.0)
    start = time.monotonic()
    with pytest.raises(ChannelTimeout, match=r"reader 1 did not read message 1 within 0.2 s") as info:
        writer.write(b"b", 0.2, poll_s=0.05)
    assert info.value.reader == 1 and 0.2 <= time.monotonic() - start < 2.0
    with pytest.raises(ChannelTimeout):  # broken: reader 0's slot was taken, nothing written
        writer.write(b"c", 5.0)
    writer.close()

    writer = BroadcastWriter(num_readers=2, num_slots=1, slot_bytes=8)
    writer.write(b"a", 1.0)
    asked: list[int] = []
    with pytest.raises(ReaderGoneError, match="reader 0 is gone"):
        writer.write(b"b", 60.0, reader_gone=lambda r: asked.append(r) or True, poll_s=0.05)
    assert asked == [0]
    writer.close()


def test_a_message_larger_than_a_slot_keeps_its_place_as_a_marker() -> None:
    writer = BroadcastWriter(num_readers=2, num_slots=2, slot_bytes=16)
    readers = [BroadcastReader(writer.handle, r) for r in range(2)]
    assert writer.write(b"x" * 16, 1.0) is True  # exactly a slot
    assert writer.write(b"y" * 17, 1.0) is False  # one byte over: the caller sends it elsewhere
    for reader in readers:
        assert (reader.read(1.0), reader.read(1.0)) == (b"x" * 16, None)
    assert writer.write(b"small", 1.0, inline=False) is False  # routed elsewhere by the caller
    assert writer.write(b"z", 1.0) is True
    for reader in readers:
        assert (reader.read(1.0), reader.read(1.0)) == (None, b"z")
    writer.close()


def test_close_unlinks_the_segment_and_the_semaphores() -> None:
    writer = BroadcastWriter(num_readers=2)
    reader = BroadcastReader(writer.handle, 0)
    files = _shm_files(writer)
    assert len(files) == 1 + 4  # the segment, ready and space per reader
    reader.close()
    writer.close()
    writer.close()  # idempotent
    assert [p for p in files if p.exists()] == []


def _follow(handle: ChannelHandle, reader_index: int, conn: Connection) -> None:
    """A spawned reader that reads as a tensor-parallel worker does, reporting each message (and
    'gone' once it sees that the engine went away) on its pipe."""
    reader = BroadcastReader(handle, reader_index)
    parent = os.getppid()
    conn.send_bytes(b"attached")
    while (message := next_message(reader, conn, parent)) is not None:
        conn.send_bytes(message)
    conn.send_bytes(b"gone")


def _time_out_after_one(handle: ChannelHandle, conn: Connection) -> None:
    reader = BroadcastReader(handle, 0)
    conn.send_bytes(b"attached")
    conn.send_bytes(reader.read(30.0) or b"marker")
    start = time.monotonic()
    try:
        reader.read(0.3)
    except ChannelTimeout as exc:
        conn.send((str(exc), time.monotonic() - start))


def test_a_reader_in_another_process_times_out_once_the_writer_is_gone() -> None:
    writer = BroadcastWriter(num_readers=1)
    ours, theirs = SPAWN.Pipe()
    process = SPAWN.Process(target=_time_out_after_one, args=(writer.handle, theirs))
    process.start()
    assert ours.poll(60) and ours.recv_bytes() == b"attached"
    writer.write(b"hello", 5.0)
    writer.close()  # the writer is gone; the reader's mapping stays valid
    assert ours.poll(10) and ours.recv_bytes() == b"hello"
    assert ours.poll(10)
    message, waited_s = ours.recv()
    # The semaphore's timed wait runs on the realtime clock and may end a millisecond or two early by
    # the monotonic one (CI saw 0.2987 s): the wait was the timeout's, not an instant failure.
    assert message == "no message within 0.3 s" and 0.28 <= waited_s < 5.0
    process.join(10)
    assert process.exitcode == 0


def test_a_killed_writer_process_leaves_no_shared_memory_and_its_reader_exits() -> None:
    # The "engine": creates the ring, spawns a reader that serves it as a worker does, sends one step
    # through the ring and one message through the pipe (a marker in the ring), then waits to be killed.
    engine = textwrap.dedent(
        f"""
        import multiprocessing, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from engine.executor.shm_broadcast import BroadcastWriter
        from tests.engine.test_shm_broadcast import _follow
        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            writer = BroadcastWriter(num_readers=1, context=ctx)
            ours, theirs = ctx.Pipe()
            reader = ctx.Process(target=_follow, args=(writer.handle, 0, theirs))
            reader.start()
            assert ours.recv_bytes() == b"attached"
            writer.write(b"step", 5.0)
            assert writer.write(b"control", 5.0, inline=False) is False
            ours.send_bytes(b"control")
            assert ours.recv_bytes() == b"step" and ours.recv_bytes() == b"control"
            print(reader.pid, writer.name, *writer.semaphore_names, flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", engine], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(line) == 4, f"the engine script failed (exit {proc.returncode})"
    reader_pid, name, *semaphores = line
    files = [Path("/dev/shm") / name, *(Path("/dev/shm") / ("sem." + s.lstrip("/")) for s in semaphores)]
    # The reader notices within its parent check (2 s); the resource tracker then unlinks what the
    # killed engine held.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (pid_alive(int(reader_pid)) or any(p.exists() for p in files)):
        time.sleep(0.1)
    assert not pid_alive(int(reader_pid)), "the reader outlived its engine"
    assert [p for p in files if p.exists()] == []
