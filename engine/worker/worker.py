"""One tensor-parallel rank: its process group, its ModelRunner (its shard of the model and of the KV
cache) and the steps it has launched, addressed by the executor's step ids.

The executor (engine/executor/multiproc_executor.py, ray_executor.py) sends every rank the same
calls in the same order: the same SchedulerOutput, so every rank applies the same diff to its own
request states and runs the same forward, meeting the others in the layers' collectives. Every rank
also samples: the LM head all-gathers the logits, so each rank draws the same ids from the same
logits with the same seeds, and has them on its device for the next step's inputs (async scheduling
scatters them there) without a broadcast. Only rank 0's output goes back to the engine.

A step that raises is kept as its exception and raised again at collect; the executor treats any
worker error as fatal (the ranks may no longer agree on what was computed).
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from engine.config import ResolvedConfig
from engine.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.executor.rendezvous import join_store
from engine.lora.request import LoRARequest
from engine.worker.model_runner import ModelRunner
from engine.worker.step_in_flight import StepInFlight

logger = logging.getLogger("weir.engine")


def init_distributed(
    config: ResolvedConfig, rank: int, device_index: int | None, init_method: str, timeout_s: float
) -> None:
    """Join the tensor-parallel process group: NCCL between GPUs, gloo on CPU (the same code in CI).
    `init_method`: the address of the rendezvous store the executor started (engine/executor/
    rendezvous.py). `timeout_s` bounds every collective, so a rank whose peer died or hangs raises
    instead of waiting."""
    world_size = config.parallel.tensor_parallel_size
    on_cuda = config.device.device == "cuda"
    if on_cuda:
        torch.cuda.set_device(device_index or 0)
    else:
        # Ranks share the host's cores: without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        backend="nccl" if on_cuda else "gloo",
        store=join_store(init_method, world_size, timeout_s),
        world_size=world_size,
        rank=rank,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    # The first collective creates the communicators: before any CUDA graph captures one.
    probe = torch.ones(1, device=torch.device("cuda", device_index or 0) if on_cuda else "cpu")
    dist.all_reduce(probe)
    if int(probe.item()) != world_size:
        raise RuntimeError(f"rank {rank}: the process group's first all-reduce gave {probe.item()}")


class Worker:
    """One rank's runner and its launched steps. Calls arrive in the executor's order."""

    def __init__(self, config: ResolvedConfig, rank: int, device_index: int | None) -> None:
        self.rank = rank
        self.runner = ModelRunner(config, rank=rank, device_index=device_index)
        self.runner.load_model(quant_config=config.quant.linear)
        self._steps: dict[int, StepInFlight | BaseException] = {}

    def startup_timings(self) -> dict[str, float]:
        """This rank's runner's start-up seconds so far (ModelRunner.timings)."""
        return dict(self.runner.timings)

    def determine_num_kv_blocks(self) -> int:
        return self.runner.determine_num_kv_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def launch(self, step_id: int, scheduler_output: SchedulerOutput, previous_id: int | None) -> None:
        previous = self._steps.get(previous_id) if previous_id is not None else None
        if isinstance(previous, BaseException):
            previous = None
        try:
            self._steps[step_id] = self.runner.execute_model_async(scheduler_output, previous)
        except Exception as exc:  # noqa: BLE001 - raised at collect, where the executor listens
            self._steps[step_id] = exc

    def collect(self, step_id: int) -> ModelRunnerOutput | None:
        """The step's output on rank 0; None elsewhere (each rank still appends its sampled ids to
        its own request states)."""
        step = self._steps.pop(step_id)
        if isinstance(step, BaseException):
            raise step
        output = step.result()
        return output if self.rank == 0 else None

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load and check an adapter into this rank's host cache (its slice goes to the slots)."""
        self.runner.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.runner.remove_lora(lora_int_id)

    def shutdown(self) -> None:
        self._steps.clear()
        self.runner.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()
