"""Where the tensor-parallel ranks meet: a torch.distributed TCPStore, its server on a port the kernel
picks as it binds.

A port found free beforehand (bind port 0, read it, close) stays free only by luck: rank 0 would bind
it seconds later, after spawning and importing torch, and another process (a concurrent job, another
engine starting) can take it in between; the engine then fails to start with "address already in use".
So the store's server is started before the ranks, by whoever must tell them the address (the engine
process for the mp backend, rank 0's actor for Ray), bound to port 0, and kept for as long as the
ranks run (their process group may use it again, e.g. to set up NCCL communicators). Every rank,
rank 0 included, joins it as a client.
"""

from __future__ import annotations

import datetime
from urllib.parse import urlsplit

import torch.distributed as dist


def start_store(host: str, timeout_s: float) -> tuple[dist.TCPStore, str]:
    """The store's server and the address the ranks join it at (`tcp://host:port`). The server
    listens on every interface; `host` is the address the ranks reach it by."""
    store = dist.TCPStore(
        host, 0, None, is_master=True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )
    return store, f"tcp://{host}:{store.port}"


def join_store(address: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A client of the store at `tcp://host:port` (start_store's address)."""
    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        raise ValueError(f"a rendezvous address is tcp://HOST:PORT; got {address!r}")
    return dist.TCPStore(
        parts.hostname,
        parts.port,
        world_size,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
