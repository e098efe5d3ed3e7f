"""Per engine request: its timings and token counts, observed into the metrics as it streams and when
it ends, the usage numbers of its response, and its one log line.

Outputs carry deltas (output_kind "delta"), so the timer counts generated tokens as they come: an
output that is not the finished one holds only what its step added.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from app.logging import get_logger
from app.protocol import PromptTokensDetails, Usage
from app.state import AppState
from engine.lora.request import LoRARequest
from engine.outputs.request_output import RequestOutput

log = get_logger("weir.app")


class RequestTimer:
    """Timings of one engine request, observed into the metrics as it streams and when it ends."""

    __slots__ = ("state", "arrival", "lora", "first_token", "last_token", "last_out", "num_generated")

    def __init__(self, state: AppState, arrival: float, lora: LoRARequest | None = None) -> None:
        self.state = state
        self.arrival = arrival
        self.lora = lora  # the adapter it runs with, for the per-adapter counters
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.last_out: RequestOutput | None = None
        self.num_generated = 0  # over the request's n sequences

    def on_output(self, out: RequestOutput) -> None:
        self.last_out = out
        new = 0
        for o in out.outputs:  # a plain loop: this runs once per streamed token
            new += len(o.token_ids_delta)
        if not new:
            return
        self.num_generated += new
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
            self.state.metrics.ttft.observe(now - self.arrival)
        else:
            self.state.metrics.itl.observe(now - self.last_token)  # type: ignore[operator]
        self.last_token = now

    def finish(self) -> dict[str, Any]:
        """Observe the end-of-request series; returns the numbers for the request's log line."""
        m = self.state.metrics
        now = time.monotonic()
        out = self.last_out
        e2e = now - self.arrival
        m.e2e.observe(e2e)
        info: dict[str, Any] = {"e2e_s": round(e2e, 4)}
        if self.first_token is not None:
            info["ttft_s"] = round(self.first_token - self.arrival, 4)
        if out is None:
            return info
        m.prompt_tokens.observe(len(out.prompt_token_ids))
        m.generation_tokens.observe(self.num_generated)
        for o in out.outputs:
            m.finished(o.finish_reason or "abort")
        if self.lora is not None and self.state.loras.get(self.lora.lora_name) is self.lora:
            # Only while it is served: an unloaded adapter's series are gone and stay gone.
            m.lora_finished(self.lora.lora_name, self.num_generated)
        rm = out.metrics
        if rm is not None and rm.first_scheduled_time is not None:
            queue = max(rm.first_scheduled_time - rm.arrival_time, 0.0)
            m.queue_time.observe(queue)
            info["queue_s"] = round(queue, 4)
        return info


def usage_of(timers: Sequence[RequestTimer]) -> Usage:
    prompt = completion = cached = 0
    for t in timers:
        out = t.last_out
        if out is None:
            continue
        prompt += len(out.prompt_token_ids)
        cached += max(out.num_cached_tokens or 0, 0)
        completion += t.num_generated
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def log_finished(
    endpoint: str, status: int, timers: Sequence[RequestTimer], stream: bool, **extra: Any
) -> None:
    """The one line per request: timings and token counts."""
    infos = [t.finish() for t in timers]
    outs = [t.last_out for t in timers]
    usage = usage_of(timers)
    fields: dict[str, Any] = {
        "endpoint": endpoint,
        "status": status,
        "stream": stream,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0,
        "finish_reasons": sorted({o.finish_reason or "abort" for out in outs if out for o in out.outputs}),
    }
    for key in ("queue_s", "ttft_s"):
        values = [i[key] for i in infos if key in i]
        if values:
            fields[key] = max(values) if key == "queue_s" else min(values)
    fields["e2e_s"] = max((i["e2e_s"] for i in infos), default=0.0)
    log.info("request finished", **fields, **extra)
