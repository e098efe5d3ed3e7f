"""LoRA adapters at run time: POST /v1/load_lora_adapter and /v1/unload_lora_adapter, with vLLM's
bodies and answers, and the start-up loading of `--lora-modules`.

Both routes are off unless `--allow-runtime-lora-updating` (a 404 that says how to turn them on) and,
like every /v1 route, behind the API key when keys are set. A name already served is a 400 (vLLM's
status; the adapter that is loaded stays as it is: unload it first to replace it). Unloading takes
the name out of routing at once, so new requests for it get 404, while requests already in the
engine finish with the adapter they started with; the engine frees it after them.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from app.errors import APIError, bad_request
from app.http import api_route, read_json
from app.logging import get_logger
from app.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from app.state import AppState
from engine.lora.request import LoRARequest

log = get_logger("weir.app")


class AdapterLoadError(Exception):
    """A start-up adapter (--lora-modules) the engine refused; the message names it."""


@api_route
async def load_lora_adapter(request: Request) -> Response:
    state: AppState = request.app.state.weir
    _check_enabled(state)
    body = await read_json(request, LoadLoRAAdapterRequest, state.config.max_body_bytes)
    name, path = body.lora_name.strip(), body.lora_path.strip()
    if not name:
        raise bad_request("lora_name must be a non-empty string.", param="lora_name")
    if not path:
        raise bad_request("lora_path must be a non-empty string.", param="lora_path")
    async with state.loras.lock:
        if name in state.model_names:
            raise bad_request(
                f"The name '{name}' is the base model's served name; choose another lora_name.",
                param="lora_name",
                code="name_in_use",
            )
        if name in state.loras:
            raise bad_request(
                f"The lora adapter '{name}' has already been loaded; unload it first to replace it.",
                param="lora_name",
                code="adapter_already_loaded",
            )
        try:
            lora = state.loras.new_request(name, path, body.fair_share)
        except ValueError as exc:  # names fair_share and its bounds
            raise bad_request(str(exc), param="fair_share") from None
        try:
            await state.engine.add_lora(lora)
        except ValueError as exc:  # the engine's message names the adapter and the field at fault
            raise bad_request(str(exc), param="lora_path") from None
        except OSError as exc:
            raise bad_request(
                f"Cannot read the lora adapter '{name}' at '{path}': {exc.strerror or exc}", param="lora_path"
            ) from None
        state.loras.add(lora)
    log.info("lora adapter loaded", lora_name=name, lora_int_id=lora.lora_int_id, lora_path=path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@api_route
async def unload_lora_adapter(request: Request) -> Response:
    state: AppState = request.app.state.weir
    _check_enabled(state)
    body = await read_json(request, UnloadLoRAAdapterRequest, state.config.max_body_bytes)
    name = body.lora_name.strip()
    if not name:
        raise bad_request("lora_name must be a non-empty string.", param="lora_name")
    async with state.loras.lock:
        lora = state.loras.remove(name)
        if lora is None:
            raise APIError(
                404,
                f"The lora adapter '{name}' cannot be found.",
                param="lora_name",
                code="adapter_not_found",
            )
        state.metrics.forget_lora(name)
        await state.engine.remove_lora(lora.lora_int_id)
    log.info("lora adapter unloaded", lora_name=name, lora_int_id=lora.lora_int_id)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _check_enabled(state: AppState) -> None:
    if not state.config.allow_runtime_lora_updating:
        raise APIError(
            404,
            "Loading and unloading LoRA adapters at run time is off on this server; start it with "
            "--allow-runtime-lora-updating (and --enable-lora) to turn it on.",
            code="not_found",
        )


async def load_startup_adapters(
    state: AppState, adapters: list[tuple[str, str]], shares: dict[str, float] | None = None
) -> None:
    """Load `--lora-modules` before serving (with their `--lora-shares`); AdapterLoadError names the
    first the engine refuses."""
    for name, path in adapters:
        lora: LoRARequest = state.loras.new_request(name, path, (shares or {}).get(name, 1.0))
        try:
            await state.engine.add_lora(lora)
        except ValueError as exc:  # the engine's message names the adapter and the field at fault
            raise AdapterLoadError(f"lora_modules: {exc}") from exc
        except OSError as exc:
            raise AdapterLoadError(
                f"lora_modules: cannot read the adapter {name!r} at {path!r}: {exc.strerror or exc}"
            ) from exc
        state.loras.add(lora)
        log.info("lora adapter loaded", lora_name=name, lora_int_id=lora.lora_int_id, lora_path=path)
