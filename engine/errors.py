"""Errors the engine raises to its callers. The HTTP layer maps each to a status code.

ValueError (bad input: a field and its limit in the message) -> 400.
"""

from __future__ import annotations


class QueueFullError(RuntimeError):
    """The waiting queue is at its request or token bound (-> 429). The message names the bound."""


class EngineDrainingError(RuntimeError):
    """The engine is shutting down and takes no new requests (-> 503)."""


class EngineDeadError(RuntimeError):
    """The step loop died; the engine cannot serve (-> 503, /health 503)."""


class RequestFailedError(RuntimeError):
    """The forward pass failed for this request; the engine may go on serving others (-> 500)."""
