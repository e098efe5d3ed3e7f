"""The tensor-parallel rendezvous (engine/executor/rendezvous.py): its store's server binds the port
it reports (nothing picks a port beforehand that another process could take before rank 0 binds it),
and ranks join it as clients. The whole process group over it: tests/e2e/test_tensor_parallel*.py."""

from __future__ import annotations

import socket

import pytest

from engine.executor.rendezvous import join_store, start_store


def test_store_listens_on_the_port_it_reports_and_ranks_join_it() -> None:
    store, address = start_store("127.0.0.1", timeout_s=10)
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == store.port > 0
    with socket.socket() as s, pytest.raises(OSError):  # held from the start: nobody else can take it
        s.bind(("127.0.0.1", store.port))
    rank0, rank1 = (join_store(address, world_size=2, timeout_s=10) for _ in range(2))
    rank0.set("hello", "from rank 0")
    assert rank1.get("hello") == b"from rank 0" and store.get("hello") == b"from rank 0"


@pytest.mark.parametrize("address", ["env://", "tcp://127.0.0.1", "127.0.0.1:1234"])
def test_join_needs_a_tcp_host_and_port(address: str) -> None:
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        join_store(address, world_size=2, timeout_s=1)
