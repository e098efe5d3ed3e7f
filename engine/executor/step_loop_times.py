"""Where the server's step loop spends its time, by phase: the answer to "is the GPU waiting for us?".

The step loop runs on the event loop, next to the HTTP handlers and the per-request streams, and
hands the forward pass to the worker thread. With async scheduling one iteration is

    schedule N+1 (loop) -> [launch N+1, wait for N's results] (worker) -> update N (loop)

and the device is busy from a launch until its results are read. The phases below add up to the
loop's wall time, so their shares say what bounds the engine:

- `device_wait` large: the device is the bottleneck (the good case under load);
- `loop_delay` large: results were ready but the event loop was busy with other tasks (streaming
  outputs, parsing requests), so the next launch came late;
- `schedule` / `launch` / `update` large: the engine's own host work is the bottleneck.

The step's parts count their own phases (LLMEngine.schedule and update; the step pipeline's launch,
wait and execute, engine/executor/step_pipeline.py), so the offline `LLMEngine.step()` and the
server's loop are measured alike; the server's loop adds `idle` and `loop_delay`. Exported as the counter `weir:step_loop_seconds_total{phase=...}` on /metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class StepLoopTimes:
    """Cumulative seconds per phase of the step loop (time.perf_counter clock)."""

    idle: float = 0.0  # no unfinished requests: waiting for work
    schedule: float = 0.0  # scheduler.schedule() on the loop
    launch: float = 0.0  # worker: build inputs and queue the forward pass
    device_wait: float = 0.0  # worker: wait for a launched step's results (sync mode: the whole step)
    loop_delay: float = 0.0  # worker finished, the event loop not yet back in the step loop
    update: float = 0.0  # apply results, detokenize, hand outputs to the streams
    steps: int = 0  # forward passes launched

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
