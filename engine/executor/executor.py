"""The executor: what the engine talks to instead of the workers.

The engine hands a step's `SchedulerOutput` to `launch` and later gets the step's
`ModelRunnerOutput` from `collect`. Both are plain data (engine/core/scheduler_output.py), so the
same calls can cross a thread (`UniprocExecutor`, today's in-process runner), a process or a Ray
actor (tensor parallelism: one runner per rank, rank 0's output returned). What `launch` returns is
the executor's own handle on the step; only that executor reads it.

`launch` takes the step launched before it, if its results have not been collected yet (async
scheduling): a decode whose input token that step is still sampling reads it on the device, and the
handles resolve in launch order whoever collects first. The step pipeline
(engine/executor/step_pipeline.py) is the one caller that keeps track of which step that is.

Which thread calls the executor is the caller's choice: the async engine runs launch and collect on
its "weir-gpu" worker thread, the offline engine on its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from engine.config import ResolvedConfig
from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.lora.request import LoRARequest
from engine.worker.model_runner import ModelRunner
from engine.worker.step_in_flight import StepInFlight

# An executor's handle on a launched step (opaque to everyone else).
LaunchedStep = Any


class Executor(ABC):
    """Runs steps on the workers: set up the KV cache once, then launch and collect steps."""

    @abstractmethod
    def determine_num_kv_blocks(self) -> int:
        """How many KV cache blocks fit (on every worker)."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache (and capture CUDA graphs over it)."""

    @abstractmethod
    def launch(self, scheduler_output: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep:
        """Queue a step on the device and return without waiting for its results. `previous` is the
        step launched before it whose results were not collected yet, or None."""

    @abstractmethod
    def collect(self, launched: LaunchedStep) -> ModelRunnerOutput:
        """A launched step's results, once they are on the host. Resolves earlier steps first."""

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its results (nothing else in flight)."""
        return self.collect(self.launch(scheduler_output, None))

    @abstractmethod
    def shutdown(self) -> None:
        """Free what the workers hold on the device (model, KV cache, graphs) now. Idempotent."""

    @property
    def is_healthy(self) -> bool:
        """False once a worker is known to be dead or failed (the engine cannot run steps)."""
        return True

    def startup_timings(self) -> dict[str, float]:
        """Rank 0's runner's start-up seconds so far (ModelRunner.timings: weights_load_s, profile_s,
        kv_alloc_s, cuda_graph_capture_s, ...); empty where unknown."""
        return {}

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load and check a LoRA adapter into every worker's host cache (raises LoRAAdapterError)."""
        raise ValueError(f"lora_request: {type(self).__name__} does not serve LoRA adapters")

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drop an adapter from the workers' host caches (requests running on it finish)."""
        return False


class UniprocExecutor(Executor):
    """One ModelRunner in this process. Its handles are the runner's StepInFlight objects."""

    def __init__(self, config: ResolvedConfig) -> None:
        # The in-process runner (tests and tools inspect it; the engine does not).
        self.runner = ModelRunner(config)
        self.runner.load_model(quant_config=config.quant.linear)

    def startup_timings(self) -> dict[str, float]:
        return dict(self.runner.timings)

    def determine_num_kv_blocks(self) -> int:
        return self.runner.determine_num_kv_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def launch(self, scheduler_output: SchedulerOutput, previous: StepInFlight | None) -> StepInFlight:
        return self.runner.execute_model_async(scheduler_output, previous)

    def collect(self, launched: StepInFlight) -> ModelRunnerOutput:
        return launched.result()

    def shutdown(self) -> None:
        self.runner.shutdown()

    def add_lora(self, lora_request: LoRARequest) -> None:
        self.runner.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.runner.remove_lora(lora_int_id)
