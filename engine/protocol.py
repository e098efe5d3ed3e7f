"""The engine-client protocol: everything the HTTP layer (app/) may use of an engine.

`engine.async_engine.AsyncEngine` is the implementation; tests/app/fake_engine.py implements it too
(declaring it as its base), and tests/app/test_engine_protocol.py checks that both define every
member here with a compatible signature, so neither the app nor the fake can drift from the engine.
Plain Python: no torch, so app/ and the fake import it freely.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from engine.core.sampling_params import SamplingParams
from engine.lora.request import LoRARequest
from engine.outputs.request_output import RequestOutput
from engine.startup_phases import StartupPhases


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_waiting_tokens: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    # Seconds by phase of the engine's steps (engine/executor/step_loop_times.py); None where there
    # is no step loop (the test fake).
    step_loop: dict[str, float] | None = None
    # Multi-LoRA, None when it is off: adapter name -> its requests running / waiting (preempted
    # included), and the adapters one step can hold (max_loras), for weir:lora_requests_info.
    running_lora_adapters: dict[str, int] | None = None
    waiting_lora_adapters: dict[str, int] | None = None
    max_loras: int = 0
    # The KV cache as configured (vLLM's cache_config_info labels): block_size, cache_dtype (the
    # caches' torch dtype), num_gpu_blocks (blocks on the engine's device), enable_prefix_caching.
    cache_config: dict[str, str] | None = None


class EngineClient(Protocol):
    # What the model is, for the routes: its tokenizer (weir's FastTokenizer or a transformers one, with
    # the same methods: engine/inputs/tokenizer.py), limits, and the sampling defaults of its
    # generation_config.json (SamplingParams names).
    tokenizer: Any
    model_path: str
    max_model_len: int
    vocab_size: int
    generation_defaults: dict[str, Any]
    # Admission bounds: beyond these the engine raises QueueFullError (-> 429).
    max_waiting_requests: int
    max_waiting_tokens: int
    # Lifecycle, for /health and the drain: warm after start(); dead_error once the step loop died.
    warm: bool
    dead_error: BaseException | None
    # Seconds per start-up phase (engine/startup_phases.py): the engine adds its own, warmup at
    # start(); the server adds its own and finishes it once it listens.
    startup_phases: StartupPhases

    @property
    def is_healthy(self) -> bool: ...

    @property
    def is_draining(self) -> bool: ...

    async def start(self) -> None:
        """Warm up and start serving (the server's lifespan calls it once)."""
        ...

    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: SamplingParams,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Validate and enqueue; returns the request's output stream, which aborts the request when
        closed early. Raises ValueError (bad input; LoRAAdapterError for an adapter that cannot be
        loaded), QueueFullError, EngineDrainingError or EngineDeadError before anything is queued."""
        ...

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """add_request as one async generator (implemented with `async def ... yield`)."""
        ...

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load a LoRA adapter so requests can name it; False if it is loaded already. Raises
        LoRAAdapterError (a ValueError naming the adapter and the field) for one weir cannot serve,
        ValueError when LoRA is off or its id or name is taken."""
        ...

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Unload an adapter; False if none such. Requests in flight on it finish."""
        ...

    def list_loras(self) -> set[int]:
        """The lora_int_id of every loaded adapter (vLLM's)."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def begin_drain(self) -> None:
        """Refuse new requests from now on (EngineDrainingError); running ones go on."""
        ...

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Drain for up to `timeout` seconds, abort what is left, stop, release the device."""
        ...
