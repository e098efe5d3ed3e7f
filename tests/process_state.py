"""Whether a process is still running, for tests that check nothing outlives an engine or server."""

from __future__ import annotations

from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
