"""Where start-up time goes: wall seconds per phase, from the process's start to the server's first
"serving" line, reported once (the "startup phases" log line and `weir:startup_phase_seconds`).

Phases, in start-up order:

- imports: interpreter start and the Python imports of weir, torch, transformers, uvicorn;
- config: settings (flags, environment, YAML), the checkpoint's config.json, device and port checks;
- tokenizer: loading the tokenizer (transformers' imports too, for a tokenizer weir does not read
  itself: the `tokenizer_loader` label says which loader ran);
- model_build: building the model's layers (and, with tensor parallelism, starting the workers);
- weights: loading (or dummy-initialising) the weights;
- kv_cache: the memory profile and the KV cache's allocation;
- cuda_graphs: capturing the CUDA graphs (0 on CPU);
- warmup: the engine's warm-up generation;
- server: building the app and uvicorn's start until the socket listens.

A phase is wall time exclusive of the phases nested in it (`begin` inside an open phase, or `add`),
so the phases never count a second twice and sum to at most `total`; what no phase covers is
`other`. One start-up is one flow of calls (threads may take turns, as the server's does), so there
is no lock. `weir serve` starts the clock at the process's start (Linux; elsewhere at the
recorder's creation); an engine built without one starts its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = (
    "imports",
    "config",
    "tokenizer",
    "model_build",
    "weights",
    "kv_cache",
    "cuda_graphs",
    "warmup",
    "server",
)


class Span:
    """One open phase: its start and the seconds of the phases nested in it."""

    __slots__ = ("name", "start", "nested")

    def __init__(self, name: str, start: float) -> None:
        self.name = name
        self.start = start
        self.nested = 0.0


class StartupPhases:
    def __init__(self, origin: float | None = None) -> None:
        """`origin`: the time.perf_counter() value start-up began at (default: now)."""
        self.origin = time.perf_counter() if origin is None else origin
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.total: float | None = None  # set by finish()
        # Facts about start-up that are not times, logged with the phases (tokenizer_loader=...).
        self.labels: dict[str, str] = {}
        self._open: list[Span] = []

    @property
    def finished(self) -> bool:
        return self.total is not None

    def begin(self, name: str) -> Span | None:
        """Open a phase; `end` it in the reverse order of opening. None once start-up has finished
        (a second app over the same engine is not a start-up)."""
        self._known(name)
        if self.finished:
            return None
        span = Span(name, time.perf_counter())
        self._open.append(span)
        return span

    def end(self, span: Span | None) -> None:
        if span is None or span not in self._open:
            return
        while self._open[-1] is not span:  # an inner phase left open by an exception
            self.end(self._open[-1])
        self._open.pop()
        elapsed = time.perf_counter() - span.start
        self.seconds[span.name] += max(elapsed - span.nested, 0.0)
        if self._open:
            self._open[-1].nested += elapsed

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        span = self.begin(name)
        try:
            yield
        finally:
            self.end(span)

    def add(self, name: str, seconds: float) -> None:
        """Seconds of a phase measured elsewhere (a worker's timings), nested in the open phase: they
        move from it to `name`."""
        self._known(name)
        if self.finished or seconds <= 0:
            return
        if self._open:
            seconds = min(seconds, time.perf_counter() - self._open[-1].start - self._open[-1].nested)
            self._open[-1].nested += seconds
        self.seconds[name] += seconds

    def _known(self, name: str) -> None:
        if name not in self.seconds:
            raise ValueError(f"unknown start-up phase {name!r}; the phases are {', '.join(PHASES)}")

    def finish(self) -> dict[str, float]:
        """Start-up is over (the server listens): close what is open, fix the total, return report()."""
        if not self.finished:
            while self._open:
                self.end(self._open[-1])
            self.total = time.perf_counter() - self.origin
        return self.report()

    def report(self) -> dict[str, float]:
        """`total_s`, then `<phase>_s` for every phase, then `other_s` (the rest of the total), rounded
        to milliseconds. Before finish(), the total so far."""
        total = self.total if self.total is not None else time.perf_counter() - self.origin
        out = {"total_s": round(total, 3)}
        out.update({f"{name}_s": round(s, 3) for name, s in self.seconds.items()})
        out["other_s"] = round(max(total - sum(self.seconds.values()), 0.0), 3)
        return out


def process_start() -> float | None:
    """The time.perf_counter() value at which this process started (Linux: /proc, 10 ms resolution),
    or None where it cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22 (starttime, clock ticks since boot) counts from the end of the command name.
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    if not 0.0 <= age < 3600.0:  # a clock that disagrees: better no origin than a wrong one
        return None
    return time.perf_counter() - age
