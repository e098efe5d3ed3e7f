"""A single-writer, N-reader broadcast ring in shared memory: the engine writes each step's message
once and every tensor-parallel rank reads the same bytes (engine/executor/multiproc_executor.py).

Layout of the segment (multiprocessing.shared_memory, created by the writer, attached by name):

    header   64 bytes: magic, number of slots, payload bytes per slot, number of readers
    slot i   a 64-byte-aligned slot header (sequence number, length, kind, one "read" flag per
             reader), then `slot_bytes` of payload; message n (1, 2, ...) lives in slot (n-1) % S

Synchronisation is two POSIX semaphores per reader (multiprocessing.Semaphore, a futex: a waiting
reader sleeps in the kernel and burns no CPU):
- `ready[r]` counts the messages reader r has not read yet: the writer posts it after a slot is
  complete, the reader waits on it with a timeout (so a reader notices a writer that is gone);
- `space[r]` counts the slots reader r has freed: the writer takes one from every reader before it
  reuses a slot, so it never overwrites a message a reader has not consumed (backpressure, also with a
  timeout and a liveness check of the lagging reader).
The semaphores' atomic operations order the payload writes before the reader's loads. The sequence
number and the read flags are checks on top: a reader refuses a slot that is not the message it
expects, the writer refuses to reuse a slot whose flags are not all set.

A message larger than a slot (or one the caller routes elsewhere) takes a slot of kind ELSEWHERE with
no payload: it keeps its place in the order and tells the readers to take the bytes from their other
channel (the executor's pipe); `write` returns False for it.

Readers must be threads of the writer's process or processes it spawned: on Python < 3.13 attaching
registers the segment with the resource tracker, which spawned children share with their parent, so
the segment is unlinked once, by the writer's close() or by the tracker after a crash.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

DEFAULT_NUM_SLOTS = 16
DEFAULT_SLOT_BYTES = 256 * 1024  # a prefill step with a few long prompts fits; larger ones take the pipe
NAME_PREFIX = "weir-bcast-"

_MAGIC = b"weirbc01"
_HEADER = struct.Struct("<8sIII")  # magic, num_slots, slot_bytes, num_readers
_HEADER_BYTES = 64
_SLOT = struct.Struct("<QQI")  # sequence number (0: never written), payload length, kind
INLINE, ELSEWHERE = 0, 1


class ChannelTimeout(TimeoutError):
    """Nothing to read before the timeout (reader), or a reader did not free a slot in time (writer)."""

    def __init__(self, message: str, reader: int) -> None:
        super().__init__(message)
        self.reader = reader


class ReaderGoneError(RuntimeError):
    """The writer waited for a slot that a reader which is no longer alive would have freed."""

    def __init__(self, reader: int) -> None:
        super().__init__(f"reader {reader} is gone")
        self.reader = reader


@dataclass(frozen=True)
class ChannelHandle:
    """What a reader needs to attach: picklable while spawning a process (the semaphores)."""

    name: str
    ready: tuple[Any, ...]  # multiprocessing.Semaphore per reader
    space: tuple[Any, ...]


def _slot_header_bytes(num_readers: int) -> int:
    return -(-(_SLOT.size + num_readers) // 64) * 64


class _Geometry:
    def __init__(self, num_slots: int, slot_bytes: int, num_readers: int) -> None:
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.num_readers = num_readers
        self.slot_header = _slot_header_bytes(num_readers)
        self.stride = self.slot_header + slot_bytes
        self.size = _HEADER_BYTES + num_slots * self.stride

    def slot_offset(self, seq: int) -> int:
        return _HEADER_BYTES + ((seq - 1) % self.num_slots) * self.stride


def segment_bytes(num_slots: int, slot_bytes: int, num_readers: int) -> int:
    """The shared-memory segment's size for this geometry."""
    return _Geometry(num_slots, slot_bytes, num_readers).size


def free_shm_bytes() -> int | None:
    """Free bytes of /dev/shm, where POSIX shared memory lives on Linux (None elsewhere). A segment
    larger than that is created without complaint (tmpfs allocates lazily) and the first write past
    the free space kills the writer with SIGBUS, so callers check first."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


class BroadcastWriter:
    """The engine's end: creates the segment and the semaphores; close() unlinks them."""

    def __init__(
        self,
        num_readers: int,
        num_slots: int = DEFAULT_NUM_SLOTS,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        context: Any = None,
    ) -> None:
        if num_readers < 1 or num_slots < 1 or slot_bytes < 1:
            raise ValueError(
                f"num_readers, num_slots and slot_bytes must be >= 1, got {num_readers}, "
                f"{num_slots}, {slot_bytes}"
            )
        ctx = context or multiprocessing.get_context("spawn")
        self.geometry = _Geometry(num_slots, slot_bytes, num_readers)
        name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self._shm: SharedMemory | None = SharedMemory(name=name, create=True, size=self.geometry.size)
        self.name = self._shm.name
        _HEADER.pack_into(self._shm.buf, 0, _MAGIC, num_slots, slot_bytes, num_readers)
        self._ready = tuple(ctx.Semaphore(0) for _ in range(num_readers))
        self._space = tuple(ctx.Semaphore(num_slots) for _ in range(num_readers))
        self._seq = 0  # the last message written
        self._broken: BaseException | None = None
        self._all_read, self._none_read = b"\x01" * num_readers, bytes(num_readers)

    @property
    def handle(self) -> ChannelHandle:
        return ChannelHandle(self.name, self._ready, self._space)

    @property
    def semaphore_names(self) -> list[str]:
        """The semaphores' names (files /dev/shm/sem.<name without '/'> while they exist)."""
        return [s._semlock.name for s in (*self._ready, *self._space)]  # noqa: SLF001

    def write(
        self,
        data: bytes | bytearray,
        timeout_s: float,
        *,
        inline: bool = True,
        reader_gone: Callable[[int], bool] | None = None,
        poll_s: float = 1.0,
    ) -> bool:
        """Broadcast one message. True: its bytes are in the slot. False (too large for a slot, or
        `inline=False`): the slot only marks its place and the caller sends the bytes to every reader
        another way. Waits for a free slot at most `timeout_s` (ChannelTimeout), asking
        `reader_gone(r)` every `poll_s` while reader r holds the slot (ReaderGoneError). After either
        error the channel is broken and every later write raises it again."""
        if self._broken is not None:
            raise self._broken
        assert self._shm is not None, "write after close"
        g = self.geometry
        seq = self._seq + 1
        for reader, space in enumerate(self._space):
            if not space.acquire(False):  # the usual case takes no clock and no wait
                self._wait_for_space(reader, seq, timeout_s, reader_gone, poll_s)
        buf = self._shm.buf
        offset = g.slot_offset(seq)
        previous, _, _ = _SLOT.unpack_from(buf, offset)
        flags = offset + _SLOT.size
        if previous and buf[flags : flags + g.num_readers] != self._all_read:
            raise RuntimeError(f"slot of message {previous} reused before every reader read it")
        fits = inline and len(data) <= g.slot_bytes
        buf[flags : flags + g.num_readers] = self._none_read
        if fits:
            payload = offset + g.slot_header
            buf[payload : payload + len(data)] = data
        _SLOT.pack_into(buf, offset, seq, len(data), INLINE if fits else ELSEWHERE)
        self._seq = seq
        for ready in self._ready:
            ready.release()
        return fits

    def _wait_for_space(
        self,
        reader: int,
        seq: int,
        timeout_s: float,
        reader_gone: Callable[[int], bool] | None,
        poll_s: float,
    ) -> None:
        """Wait until `reader` frees the slot message `seq` goes into (backpressure)."""
        space = self._space[reader]
        deadline = time.monotonic() + timeout_s
        try:
            while not space.acquire(timeout=min(poll_s, max(deadline - time.monotonic(), 0.0))):
                if reader_gone is not None and reader_gone(reader):
                    raise ReaderGoneError(reader)
                if time.monotonic() >= deadline:
                    raise ChannelTimeout(
                        f"reader {reader} did not read message {seq - self.geometry.num_slots} "
                        f"within {timeout_s:g} s (all {self.geometry.num_slots} slots full)",
                        reader,
                    )
        except BaseException as exc:
            self._broken = exc  # other readers' slots are taken and nothing was written
            raise

    def close(self) -> None:
        """Unlink the segment and drop the semaphores (unlinked when their last reference goes; the
        readers' copies die with their processes). Idempotent."""
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None
        self._ready = self._space = ()


class BroadcastReader:
    """Reader r's end: attaches to the segment by name and reads every message in order."""

    def __init__(self, handle: ChannelHandle, reader: int) -> None:
        if sys.version_info >= (3, 13):
            self._shm: SharedMemory | None = SharedMemory(name=handle.name, track=False)
        else:  # registers with the resource tracker this process shares with the writer's
            self._shm = SharedMemory(name=handle.name)
        magic, num_slots, slot_bytes, num_readers = _HEADER.unpack_from(self._shm.buf, 0)
        if magic != _MAGIC or not 0 <= reader < num_readers:
            raise ValueError(f"{handle.name} is not a broadcast channel with a reader {reader}")
        self.geometry = _Geometry(num_slots, slot_bytes, num_readers)
        self.reader = reader
        self._ready = handle.ready[reader]
        self._space = handle.space[reader]
        self._seq = 0  # the last message read

    def read(self, timeout_s: float) -> bytes | None:
        """The next message's bytes, or None when the writer sent them another way (the caller reads
        its other channel now, before the next message). ChannelTimeout if none came in time."""
        if not self._ready.acquire(timeout=timeout_s):
            raise ChannelTimeout(f"no message within {timeout_s:g} s", self.reader)
        assert self._shm is not None, "read after close"
        g = self.geometry
        seq = self._seq + 1
        buf = self._shm.buf
        offset = g.slot_offset(seq)
        found, length, kind = _SLOT.unpack_from(buf, offset)
        if found != seq:
            raise RuntimeError(f"reader {self.reader} expected message {seq}, the slot holds {found}")
        payload = offset + g.slot_header
        data = bytes(buf[payload : payload + length]) if kind == INLINE else None
        buf[offset + _SLOT.size + self.reader] = 1
        self._seq = seq
        self._space.release()
        return data

    def close(self) -> None:
        """Detach (the writer unlinks). Drops this end's semaphores: in the writer's process they
        are unlinked when the last reference goes."""
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self._ready = self._space = None
