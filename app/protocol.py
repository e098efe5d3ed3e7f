"""OpenAI-compatible request and response bodies as msgspec Structs, decoded once at the edge.

Requests: fields OpenAI clients send, plus vLLM's extensions (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, min_tokens, skip_special_tokens, priority). Optional fields accept an
explicit JSON null, as many clients send one. Unknown fields are ignored (msgspec's default); the
route logs their names at debug level.

Responses: what the official SDKs parse. Fields a stream chunk leaves out are `UNSET`.
"""

from __future__ import annotations

from typing import Any

from msgspec import UNSET, Struct, UnsetType

# ---------------------------------------------------------------- errors


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(Struct):
    error: ErrorInfo


# ---------------------------------------------------------------- requests


class StreamOptions(Struct):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingRequest(Struct, kw_only=True):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    # Beam search (vLLM's extra fields): n is the beam width; the n best beams come back, once.
    use_beam_search: bool | None = False
    length_penalty: float | None = 1.0
    early_stopping: bool | str | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    priority: int | None = 0
    user: str | None = None  # accepted and ignored, as OpenAI documents it for abuse tracking
    # Refused unless at their defaults (app/unsupported.py): weir has no structured output yet.
    response_format: Any = None
    # vLLM's extra fields that would change the output: declared so that they are refused (app/unsupported.py),
    # not ignored as unknown fields are.
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structured_outputs: Any = None
    prompt_logprobs: Any = None
    truncate_prompt_tokens: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: Any = None
    add_special_tokens: Any = None  # completions: True (the default) is what weir does; chat: False


class CompletionRequest(SamplingRequest, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]: msgspec unions allow one array type, so the
    # route checks the shape itself and names `prompt` when it is wrong.
    prompt: Any
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any = None  # refused when set (weir has no tool calling yet)


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    # Refused unless at their defaults (app/unsupported.py): weir has no tool calling yet, and so on.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    web_search_options: Any = None
    # vLLM's extra chat fields, refused unless at their defaults (app/unsupported.py)
    chat_template: Any = None
    chat_template_kwargs: Any = None
    documents: Any = None
    continue_final_message: Any = None
    echo: Any = None
    # Completions' (and vLLM's chat) best_of: declared so that it is refused rather than ignored as an
    # unknown field (best_of > 1 would change which samples come back).
    best_of: Any = None


class TokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class DetokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(Struct):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | UnsetType = UNSET
    object: str = "text_completion"


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(Struct):
    role: str
    content: str | None


class ChatChoice(Struct):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class DeltaMessage(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | UnsetType = UNSET
    object: str = "chat.completion.chunk"


class ModelCard(Struct):
    id: str
    created: int
    max_model_len: int
    root: str
    object: str = "model"
    owned_by: str = "weir"
    parent: str | None = None  # a LoRA adapter's base model (its id); None for the base model


class LoadLoRAAdapterRequest(Struct):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str
    lora_path: str
    # weir's: the adapter's share under --scheduling-policy fair (LoRARequest.fair_share; default 1).
    fair_share: float = 1.0


class UnloadLoRAAdapterRequest(Struct):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: str
    lora_int_id: int | None = None  # accepted as vLLM does; the name is what identifies the adapter


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(Struct):
    prompt: str


def field_names(struct_type: type[Struct]) -> frozenset[str]:
    return frozenset(struct_type.__struct_fields__)
