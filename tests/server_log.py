"""`weir serve`'s log lines (JSON, one object a line, app/logging.py), for tests that read them."""

from __future__ import annotations

import json


def log_entry(line: str) -> dict | None:
    """The line's JSON object, or None for a line that is not one (e.g. a library's own warning)."""
    if not line.startswith("{"):
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def log_entries(text: str) -> list[dict]:
    return [entry for line in text.splitlines() if (entry := log_entry(line)) is not None]


def serving_port(text: str) -> int | None:
    """The port on the server's "serving" line (the one it bound, with --port 0), or None before it."""
    for entry in log_entries(text):
        if entry.get("event") == "serving":
            return entry["port"]
    return None
