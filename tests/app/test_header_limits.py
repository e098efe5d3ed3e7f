"""Bounds on the request head, on raw sockets against a live server: 431 for too many or too large
headers (however they arrive), 408 and a closed connection for a head that never ends, and the server
keeps serving others meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import LiveServer, start_server
from tests.app.fake_engine import FakeEngine
from tests.app.rawhttp import connect, error_of, is_closed, read_response, send_all_until_closed

HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def strict_server(tiny_tokenizer_dir: Path) -> Iterator[LiveServer]:
    """Small bounds, so the tests send little."""
    live = start_server(
        FakeEngine(tiny_tokenizer_dir, max_model_len=128),
        max_header_bytes=8192,
        max_header_count=20,
        header_timeout=0.5,
    )
    yield live
    live.stop()


def _assert_431(status: int, body: bytes, what: str) -> None:
    assert status == 431
    err = error_of(body)
    assert err["code"] == "request_header_fields_too_large" and what in err["message"]


def test_one_megabyte_header_is_431_with_default_bounds(server: LiveServer) -> None:
    with connect(server.base_url) as s:
        send_all_until_closed(s, HEAD + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        status, headers, body = read_response(s)
        _assert_431(status, body, "larger than 65536 bytes")
        assert headers["connection"] == "close" and is_closed(s)
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_too_many_headers_is_431(server: LiveServer) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(257))
    with connect(server.base_url) as s:
        s.sendall(HEAD + many + b"\r\n")
        _assert_431(*read_response(s)[::2], "more than 256 header fields")
    with connect(server.base_url) as s:  # 256 is still fine
        s.sendall(HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(254)) + b"\r\n")
        assert read_response(s)[0] == 200


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(HEAD + b"X-Big: " + b"a" * 9000, id="endless-value"),
        pytest.param(HEAD + b"X-" + b"n" * 9000, id="endless-name"),
        pytest.param(b"GET /" + b"u" * 9000, id="endless-url"),
        pytest.param(HEAD + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(9)), id="many-lines"),
    ],
)
def test_head_over_the_byte_bound_is_431_before_it_ends(strict_server: LiveServer, head: bytes) -> None:
    """The head never completes: the server answers as soon as it is over the bound, not at its end."""
    with connect(strict_server.base_url) as s:
        s.sendall(head)
        status, _, body = read_response(s)
        _assert_431(status, body, "larger than 8192 bytes")
        assert is_closed(s)


def test_completed_head_over_the_byte_bound_in_one_packet(strict_server: LiveServer) -> None:
    with connect(strict_server.base_url) as s:
        s.sendall(HEAD + b"X-Big: " + b"a" * 8200 + b"\r\n\r\n")
        _assert_431(*read_response(s)[::2], "larger than 8192 bytes")


def test_slow_head_is_cut_off_and_others_are_served(strict_server: LiveServer) -> None:
    t0 = time.monotonic()
    with connect(strict_server.base_url) as idle, connect(strict_server.base_url) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(3):  # drips a header line well within the byte bound
            assert httpx.get(strict_server.base_url + "/health").status_code == 200
            try:
                slow.sendall(b"X-Drip: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.2)
        status, _, body = read_response(slow)
        assert status == 408 and error_of(body)["code"] == "request_timeout"
        assert is_closed(slow)
        # A connection that never sends a byte is closed too (uvicorn alone would keep it forever).
        assert read_response(idle)[0] == 408 and is_closed(idle)
    assert time.monotonic() - t0 < 5


def test_keep_alive_requests_each_get_the_full_bounds(strict_server: LiveServer) -> None:
    """The bounds are per request: many small requests on one connection are all served."""
    with connect(strict_server.base_url) as s:
        for _ in range(5):
            s.sendall(HEAD + b"X-A: " + b"a" * 4000 + b"\r\n\r\n")
            assert read_response(s)[0] == 200


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_endless_heads_on_four_connections_cost_no_memory(server: LiveServer) -> None:
    """The issue's attack (4 x 200 MB of header, here 4 x 20 MB): each connection is answered and
    closed after the bound, the server's memory does not grow with what is sent, /health stays fast."""
    from concurrent.futures import ThreadPoolExecutor

    payload = HEAD + b"X-Big: " + b"a" * (20 << 20)  # never ends

    def attack(_: int) -> int:
        with connect(server.base_url, timeout=30) as s:
            send_all_until_closed(s, payload)
            try:
                return read_response(s)[0]
            except ConnectionResetError:
                return 0

    before = _rss_bytes()
    with ThreadPoolExecutor(4) as pool:
        attacks = [pool.submit(attack, i) for i in range(4)]
        worst = 0.0
        while not all(a.done() for a in attacks):
            t0 = time.perf_counter()
            assert httpx.get(server.base_url + "/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
        statuses = [a.result() for a in attacks]
    assert all(s in (431, 0) for s in statuses), statuses  # 0: the reset beat the answer
    assert _rss_bytes() - before < 30 << 20
    assert worst < 1.0
