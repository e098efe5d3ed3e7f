"""GET /openapi.json: the API as OpenAPI 3.1, generated from the msgspec types the routes decode and
encode (app/protocol.py), so the document cannot drift from what the server accepts.

msgspec writes JSON Schema 2020-12, which OpenAPI 3.1 uses as is. The few fields the types leave as
`Any` (a prompt's four shapes, fields refused unless at their default) get their shapes here.
"""

from __future__ import annotations

from typing import Any

import msgspec

from app import __version__
from app.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    LoadLoRAAdapterRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)

_REF = "#/components/schemas/{name}"

_PROMPT = {
    "description": "A string, a list of strings, a list of token ids, or a list of lists of token ids.",
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    ],
}

# status -> when (every error body is the OpenAI envelope, ErrorBody)
_ERRORS = {
    "400": "Invalid request: the `param` field names the request field at fault.",
    "401": "Missing or wrong API key (with --api-key).",
    "404": "Unknown model (or, for the LoRA routes, adapter; or the routes are off).",
    "413": "Body larger than --max-body-bytes.",
    "415": "Content-Type is not JSON.",
    "429": "The waiting queue is full now; retry after Retry-After seconds.",
    "503": "Shutting down, or the engine has stopped.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {s: {"description": _ERRORS[s], "content": _json(_ref("ErrorBody"))} for s in statuses}


def _post(summary: str, request: str, response: str, stream: bool = False) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK", "content": _json(_ref(response))}
    if stream:
        ok["content"]["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "With stream=true: `data: {chunk}` events, then `data: [DONE]`.",
            }
        }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(_ref(request))},
            "responses": {"200": ok, **_errors("400", "401", "404", "413", "415", "429", "503")},
        }
    }


def _lora_post(summary: str, request: str) -> dict[str, Any]:
    ok = {"description": "Done", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(_ref(request))},
            "responses": {"200": ok, **_errors("400", "401", "404", "413", "415")},
        }
    }


def _get(summary: str, content: dict[str, Any], *errors: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": content}, **_errors(*errors)},
        }
    }


def build_openapi() -> dict[str, Any]:
    types = [
        CompletionRequest,
        CompletionResponse,
        ChatCompletionRequest,
        ChatCompletionResponse,
        TokenizeRequest,
        TokenizeResponse,
        DetokenizeRequest,
        DetokenizeResponse,
        ModelList,
        ErrorBody,
        LoadLoRAAdapterRequest,
        UnloadLoRAAdapterRequest,
    ]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    components["CompletionRequest"]["properties"]["prompt"] = _PROMPT
    status = {
        "type": "object",
        "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
        "required": ["status"],
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "weir",
            "version": __version__,
            "description": "OpenAI-compatible completions and chat completions, plus vLLM's extensions.",
        },
        "paths": {
            "/v1/completions": _post("Create a completion", "CompletionRequest", "CompletionResponse", True),
            "/v1/chat/completions": _post(
                "Create a chat completion", "ChatCompletionRequest", "ChatCompletionResponse", True
            ),
            "/tokenize": _post("Tokenize a prompt or messages", "TokenizeRequest", "TokenizeResponse"),
            "/detokenize": _post("Token ids to text", "DetokenizeRequest", "DetokenizeResponse"),
            "/v1/load_lora_adapter": _lora_post(
                "Load a LoRA adapter (with --allow-runtime-lora-updating)", "LoadLoRAAdapterRequest"
            ),
            "/v1/unload_lora_adapter": _lora_post(
                "Unload a LoRA adapter (with --allow-runtime-lora-updating)", "UnloadLoRAAdapterRequest"
            ),
            "/v1/models": _get("The served models", _json(_ref("ModelList")), "401"),
            "/health": {
                "get": {
                    "summary": "Liveness and readiness",
                    "responses": {
                        "200": {"description": "Serving", "content": _json(status)},
                        "503": {"description": "Starting, draining or dead", "content": _json(status)},
                    },
                }
            },
            "/version": _get(
                "The server's version",
                _json(
                    {"type": "object", "properties": {"version": {"type": "string"}}, "required": ["version"]}
                ),
                "401",
            ),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": components},
    }
