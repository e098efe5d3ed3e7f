"""The Starlette app factory and the small routes (/health, /v1/models, /version, /metrics,
/tokenize, /detokenize). The generation routes live in completions.py and chat.py.

`build_app(engine, server_config)` takes an engine that is loaded but not started: the lifespan starts
its step loop on the server's event loop and drains it on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import __version__
from app.chat import create_chat_completion
from app.chat_render import render_chat
from app.completions import create_completion
from app.config import ServerConfig
from app.errors import APIError, bad_request
from app.http import APIKeyMiddleware, api_route, read_json
from app.logging import get_logger
from app.lora_routes import AdapterLoadError, load_lora_adapter, load_startup_adapters, unload_lora_adapter
from app.openapi import build_openapi
from app.prompt_processing import check_token_ids
from app.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from app.sse import encoder
from app.state import AppState
from engine.protocol import EngineClient

log = get_logger("weir.app")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(encoder.encode(obj), status_code=status, media_type="application/json")


async def health(request: Request) -> Response:
    state: AppState = request.app.state.weir
    engine = state.engine
    if state.startup_error is not None:
        return JSONResponse({"status": "unhealthy", "reason": state.startup_error}, status_code=503)
    if state.draining:
        return JSONResponse({"status": "draining", "reason": "the server is shutting down"}, status_code=503)
    if not engine.is_healthy:
        reason = (
            f"the engine stopped: {engine.dead_error!r}" if engine.dead_error else "the engine is unhealthy"
        )
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
    if not engine.warm:
        return JSONResponse({"status": "starting", "reason": "the engine is warming up"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def models(request: Request) -> Response:
    state: AppState = request.app.state.weir
    cards = [
        ModelCard(
            id=name,
            created=state.created,
            max_model_len=state.max_model_len,
            # The checkpoint's directory name, not its path: clients need not learn the server's layout.
            root=Path(str(state.engine.model_path)).name or name,
        )
        for name in state.model_names
    ]
    cards += [
        ModelCard(
            id=lora.lora_name,
            created=state.created,
            max_model_len=state.max_model_len,
            root=lora.lora_path,
            parent=state.model_name,
        )
        for lora in state.loras.all()
    ]
    return _json(ModelList(data=cards))


async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.weir
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@api_route
async def tokenize(request: Request) -> Response:
    state: AppState = request.app.state.weir
    req = await read_json(request, TokenizeRequest, state.config.max_body_bytes)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Send exactly one of prompt or messages.", param="prompt")
    # Off the event loop: a body of up to --max-body-bytes of text is seconds of tokenizing.
    if req.prompt is not None:
        tokens = await state.encoder.run(
            state.encoder.encode, req.prompt, req.add_special_tokens is not False
        )
    else:
        tokens = await state.encoder.run(
            render_chat, state, req.messages or [], req.add_generation_prompt is not False
        )
    return _json(TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens))


@api_route
async def detokenize(request: Request) -> Response:
    state: AppState = request.app.state.weir
    req = await read_json(request, DetokenizeRequest, state.config.max_body_bytes)
    state.check_model(req.model)
    check_token_ids(state, req.tokens, "tokens")
    return _json(DetokenizeResponse(prompt=await state.encoder.run(state.encoder.decode, req.tokens)))


def _openapi_route() -> Any:
    body = encoder.encode(build_openapi())  # once: the document only depends on the code

    async def openapi(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return openapi


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"No route {request.url.path}.", 405: f"Method {request.method} not allowed here."}.get(
        exc.status_code, str(exc.detail)
    )
    err = APIError(
        exc.status_code, message, code="not_found" if exc.status_code == 404 else "invalid_request"
    )
    response = err.response()
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def build_app(engine: EngineClient, server_config: ServerConfig) -> Starlette:
    """The ASGI app over a loaded, not yet started engine."""
    server_phase = engine.startup_phases.begin("server")  # ends once the socket listens (app.runner)
    state = AppState(engine, server_config)
    state.startup_span = server_phase

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()
        try:
            await load_startup_adapters(state, server_config.lora_adapters, server_config.lora_share_map)
        except AdapterLoadError as exc:
            # Not raised: uvicorn would log the lifespan's traceback and sys.exit(3). The server
            # stops as soon as it has started (WeirServer.startup) and `weir serve` prints this line.
            state.startup_error = str(exc)
            state.draining = True
        else:
            log.info(
                "engine started",
                model=str(engine.model_path),
                served_model_names=state.model_names,
                lora_adapters=[lora.lora_name for lora in state.loras.all()],
                max_model_len=state.max_model_len,
            )
        try:
            yield
        finally:
            await state.drain(server_config.shutdown_timeout)

    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/openapi.json", _openapi_route(), methods=["GET"]),
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
    ]
    middleware = [Middleware(APIKeyMiddleware, api_keys=list(server_config.api_key))]
    if server_config.allowed_origins:
        # Outermost, so a browser's preflight (OPTIONS, no Authorization) is answered before the key check.
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=server_config.allowed_origins,
                allow_methods=server_config.allowed_methods,
                allow_headers=server_config.allowed_headers,
                allow_credentials=server_config.allow_credentials,
            ),
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.weir = state
    return app
