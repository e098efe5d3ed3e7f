"""Submitting a request's prompts to the engine client: all or none, refusals as envelopes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio

from app.errors import APIError, service_unavailable
from app.logging import get_logger
from app.prompt_processing import Prompt
from app.request_mapping import FieldNames, error_from_refusal
from app.state import AppState
from engine.core.sampling_params import SamplingParams
from engine.lora.request import LoRARequest
from engine.outputs.request_output import RequestOutput

log = get_logger("weir.app")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def submit(
    state: AppState,
    request_ids: Sequence[str],
    prompts: Sequence[Prompt],
    params: SamplingParams,
    priority: int,
    names: FieldNames,
    lora: LoRARequest | None = None,
) -> list[AsyncIterator[RequestOutput]]:
    """One engine request per prompt, validated by the engine's input processor; all or none: on a
    refusal the ones already added are aborted and the refusal becomes its envelope. `lora`: the
    adapter the request's model named (None: the base model)."""
    if state.draining:
        raise service_unavailable("The server is shutting down and takes no new requests.", "draining")
    if lora is not None and state.loras.get(lora.lora_name) is not lora:
        # Unloaded while the prompt was being tokenized: as if it had arrived after the unload.
        raise state.model_not_found(lora.lora_name)
    check_queue_bounds(state, [len(ids) for _, ids in prompts], params.n, names.prompt, params.best_of)
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        for rid, (text, token_ids) in zip(request_ids, prompts, strict=True):
            streams.append(await state.engine.add_request(rid, text, token_ids, params, priority, lora))
    except BaseException as exc:
        await close_streams(streams)
        if isinstance(exc, Exception) and (err := error_from_refusal(exc, names)) is not None:
            raise err from None
        raise
    return streams


def check_queue_bounds(
    state: AppState, prompt_lens: Sequence[int], n: int, prompt_field: str, best_of: int | None = None
) -> None:
    """400, naming the bound, for a request larger than the waiting queue itself: it could never be
    admitted, so a 429 (retry later) would have well-behaved clients retry forever. Kept here, not
    left to the engine: the engine sees one prompt at a time, a request may carry several. Each of a
    prompt's sequences takes a place: best_of of them when best_of > n."""
    max_requests, max_tokens = state.queue_bounds
    field, per_prompt = ("best_of", best_of) if best_of is not None and best_of > n else ("n", n)
    sequences = len(prompt_lens) * per_prompt
    if sequences > max_requests:
        raise APIError(
            400,
            f"This request needs {sequences} places in the waiting queue ({len(prompt_lens)} prompt(s) x "
            f"{field}={per_prompt}) but the server's whole queue holds {max_requests} (max_waiting_requests), "
            f"so it could never be admitted. Send fewer prompts or a smaller {field}.",
            param=field if per_prompt > 1 else prompt_field,
            code="exceeds_queue_bound",
        )
    tokens = sum(prompt_lens) * per_prompt
    if tokens > max_tokens:
        raise APIError(
            400,
            f"This request needs {tokens} prompt tokens in the waiting queue ({sum(prompt_lens)} prompt "
            f"tokens x {field}={per_prompt}) but the server's whole queue holds {max_tokens} "
            f"(max_waiting_tokens), so it could never be admitted. Send a shorter {prompt_field} or a "
            f"smaller {field}.",
            param=prompt_field,
            code="exceeds_queue_bound",
        )


async def close_streams(streams: Sequence[Any]) -> None:
    """Abort the streams' requests (frees their KV blocks), even inside a cancelled scope."""
    with anyio.CancelScope(shield=True):
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.warning("closing an engine stream failed", exc_info=True)
