"""What every route needs: the engine, the server settings, the metrics, and the drain state."""

from __future__ import annotations

import asyncio
import time
from functools import lru_cache
from typing import Any

from app.config import ServerConfig
from app.errors import APIError
from app.logging import get_logger
from app.lora_registry import LoRARegistry
from app.metrics import ServerMetrics
from app.prompt_encoder import PromptEncoder
from engine.lora.request import LoRARequest
from engine.protocol import EngineClient
from engine.startup_phases import Span

log = get_logger("weir.app")

MAX_ECHOED_NAME = 100


class AppState:
    def __init__(self, engine: EngineClient, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_names = list(config.served_model_name) or ["model"]
        self.model_name = self.model_names[0]
        # Served LoRA adapters (app/lora_routes.py loads them): a request's model may name one.
        self.loras = LoRARegistry()
        self.tokenizer = engine.tokenizer
        self.encoder = PromptEncoder(self.tokenizer)
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.vocab_size
        # The waiting queue's bounds.
        self.queue_bounds: tuple[int, int] = (engine.max_waiting_requests, engine.max_waiting_tokens)
        # Sampling defaults from the model's generation_config.json (temperature, top_p, ...), applied
        # to fields a request leaves unset, as vLLM does. max_tokens is left to each endpoint's rule.
        defaults = dict(engine.generation_defaults)
        defaults.pop("max_tokens", None)
        self.sampling_defaults: dict[str, Any] = defaults
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine, self.model_name, self.max_model_len)
        self.draining = False
        self.startup_error: str | None = None  # why the lifespan's start-up failed, for `weir serve`
        self.startup_span: Span | None = None  # the "server" start-up phase, open until listening
        self._drain_task: asyncio.Task[None] | None = None
        # Token id -> its text, for logprobs. Bounded by the vocabulary.
        self.token_text = lru_cache(maxsize=None)(self._token_text)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def check_model(self, model: str | None) -> str:
        """The served name to answer with; 404 for a model this server does not serve."""
        return self.resolve_model(model)[0]

    def resolve_model(self, model: str | None) -> tuple[str, LoRARequest | None]:
        """The served name to answer with and the adapter it selects (None: the base model); 404 for
        a name this server does not serve, listing the names it does."""
        if model is None or model == "":
            return self.model_name, None
        if model in self.model_names:
            return model, None
        lora = self.loras.get(model)
        if lora is None:
            raise self.model_not_found(model)
        return model, lora

    def model_not_found(self, model: str) -> APIError:
        # Echo at most a short prefix: a client's 100 KB name is not worth sending back.
        shown = model if len(model) <= MAX_ECHOED_NAME else model[:MAX_ECHOED_NAME] + "..."
        served = self.model_names + [lora.lora_name for lora in self.loras.all()]
        return APIError(
            404,
            f"The model `{shown}` does not exist. This server serves: {', '.join(served)}.",
            param="model",
            code="model_not_found",
        )

    def finish_startup(self) -> None:
        """The server listens: close the start-up phases and log them, once per engine (one line
        with the labels (tokenizer_loader), total_s, <phase>_s for each phase and other_s)."""
        phases = self.engine.startup_phases
        if phases.finished:
            return
        phases.end(self.startup_span)
        log.info("startup phases", **phases.labels, **phases.finish())

    # ---------------------------------------------------------------- shutdown

    async def drain(self, timeout: float) -> None:
        """Refuse new work, let in-flight requests finish for up to `timeout` s, then abort the rest.

        Idempotent: SIGTERM starts it, the lifespan shutdown waits for the same run.
        """
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain(timeout))
        await asyncio.shield(self._drain_task)

    async def _drain(self, timeout: float) -> None:
        self.draining = True
        try:
            stats = self.engine.stats()
            in_flight = stats.num_running + stats.num_waiting
        except Exception:
            in_flight = None
        log.info("draining", in_flight=in_flight, timeout_s=timeout)
        self.engine.begin_drain()
        t0 = time.monotonic()
        await self.engine.shutdown(timeout=timeout)
        self.encoder.close()
        log.info("engine stopped", drain_s=round(time.monotonic() - t0, 3))
