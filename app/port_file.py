"""--port-file: the port `weir serve` listens on, in a file, for whoever started it with --port 0.

With --port 0 the kernel picks a free port as the server binds, so no other process can take it in
between (a port picked beforehand and passed as --port can be). The file holds the port number and a
newline. It is removed before the model loads (a stale one from an earlier run says nothing), written
(atomically: a reader never sees half of it) once the server is listening and /health answers, and
removed again at exit. So: the file exists only while this server serves on the port it names.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def prepare_port_file(path: str | None) -> str | None:
    """Before loading: remove a stale file; a directory that cannot take the file is the user's error
    (one line), found now rather than after minutes of loading."""
    if not path:
        return None
    target = Path(path)
    if target.is_dir():
        return f"--port-file {path!r} is a directory; pass a file path"
    if not target.parent.is_dir():
        return f"--port-file {path!r}: the directory {str(target.parent)!r} does not exist"
    if not os.access(target.parent, os.W_OK | os.X_OK):
        return f"--port-file {path!r}: the directory {str(target.parent)!r} is not writable"
    try:
        target.unlink(missing_ok=True)
    except OSError as exc:
        return f"--port-file {path!r}: cannot remove the old file ({exc.strerror})"
    return None


def write_port_file(path: str, port: int) -> None:
    """Write `port` to `path` through a rename, so a reader sees the whole number or no file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, target)


def remove_port_file(path: str | None) -> None:
    if path:
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)


def read_port_file(path: str | Path) -> int | None:
    """The port in a file `write_port_file` wrote, or None while there is none."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") else None
