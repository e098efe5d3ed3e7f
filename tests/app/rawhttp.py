"""Raw-socket HTTP for requests an HTTP client library would refuse to send (huge or endless headers)."""

from __future__ import annotations

import json
import socket
import time


def connect(base_url: str, timeout: float = 10.0) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one response with a content-length; (0, {}, b"") if closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, b""
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def send_all_until_closed(sock: socket.socket, data: bytes, chunk: int = 65536) -> int:
    """Send `data` in chunks until done or the server stops reading/closes; returns bytes sent."""
    sent = 0
    try:
        while sent < len(data):
            sock.sendall(data[sent : sent + chunk])
            sent += chunk
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


def is_closed(sock: socket.socket, within: float = 5.0) -> bool:
    """True if the server closes the connection within `within` seconds (reads past any response)."""
    deadline = time.monotonic() + within
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False
