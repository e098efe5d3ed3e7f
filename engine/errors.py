"""Errors the engine raises to its callers. The HTTP layer maps each to a status code.

ValueError (bad input: a field and its limit in the message) -> 400; the engine raises it as
InvalidRequestError (or ContextLengthError), which carry the field and the numbers.
"""

from __future__ import annotations


class QueueFullError(RuntimeError):
    """The waiting queue is at its request or token bound (-> 429). The message names the bound."""


class EngineDrainingError(RuntimeError):
    """The engine is shutting down and takes no new requests (-> 503)."""


class EngineShutdownError(EngineDrainingError):
    """shutdown() was called: the engine has released its model and KV cache and runs nothing more
    (-> 503, as draining)."""


class EngineDeadError(RuntimeError):
    """The step loop died; the engine cannot serve (-> 503, /health 503)."""


class RequestFailedError(RuntimeError):
    """The forward pass failed for this request; the engine may go on serving others (-> 500)."""


class InvalidRequestError(ValueError):
    """A request the engine refuses as given (-> 400). `param` names the field at fault; the message
    starts with it, as every ValueError of the engine does, so callers that only catch ValueError and
    read the message keep working."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedRequestError(InvalidRequestError):
    """A request asking for something weir does not support yet, e.g. a chat message's tool calls
    (-> 400, code "unsupported")."""


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt plus max_tokens, does not fit the model's context (-> 400,
    context_length_exceeded). Carries the numbers, so a caller can word its own message."""

    def __init__(self, prompt_tokens: int, max_model_len: int, max_tokens: int | None = None) -> None:
        if max_tokens is None:
            param = "prompt"
            message = f"prompt ({prompt_tokens} tokens) is longer than max_model_len ({max_model_len}) allows"
        else:
            param = "max_tokens"
            message = (
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {prompt_tokens + max_tokens} "
                f"exceeds max_model_len ({max_model_len})"
            )
        super().__init__(param, message)
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens


class LoRAAdapterError(InvalidRequestError):
    """A LoRA adapter weir cannot serve (engine.lora.adapter): the message names the adapter and the
    field at fault (`field`: a config key, a file or a tensor name)."""

    def __init__(self, lora_name: str, field: str, detail: str) -> None:
        super().__init__("lora_request", f"LoRA adapter {lora_name!r}: {field}: {detail}")
        self.lora_name = lora_name
        self.field = field
