"""The OpenAI protocol mapped onto the engine's, both ways: request fields -> SamplingParams, and the
engine's refusals -> the error envelope that names the request's own field.

Validation of values is the engine's: SamplingParams checks ranges as it is built, the input
processor (engine/inputs/input_processor.py) checks the prompt against the vocabulary and the
context. Their errors are typed (InvalidRequestError with `param`, ContextLengthError with the
numbers); here they are only reworded for the route's field names (`messages`,
`max_completion_tokens`, `top_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.errors import APIError, bad_request, error_from_engine, error_from_value_error
from app.protocol import SamplingRequest
from app.state import AppState
from engine.core.sampling_params import SamplingParams
from engine.errors import ContextLengthError, InvalidRequestError

# Fields of the request whose names may lead a plain engine ValueError (one without a `param`).
SAMPLING_FIELDS = frozenset(
    {
        "n",
        "best_of",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "seed",
        "stop",
        "stop_token_ids",
        "min_tokens",
        "max_tokens",
        "logprobs",
        "prompt_logprobs",
        "prompt",
        "priority",
        "use_beam_search",
        "length_penalty",
        "early_stopping",
    }
)

# Request fields copied to SamplingParams under the same name when set.
_SAME_NAME = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
)


@dataclass(frozen=True, slots=True)
class FieldNames:
    """The route's names for the engine's fields, for error messages and `param`."""

    prompt: str = "prompt"  # "messages" for chat
    max_tokens: str = "max_tokens"  # "max_completion_tokens" when chat sent that one
    renames: dict[str, str] = field(default_factory=dict)  # other engine field -> request field

    def of(self, param: str | None) -> str | None:
        if param == "prompt":
            return self.prompt
        if param == "max_tokens":
            return self.max_tokens
        return self.renames.get(param, param) if param is not None else None


COMPLETION_FIELDS = FieldNames()


def sampling_params(
    req: SamplingRequest,
    state: AppState,
    names: FieldNames,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    best_of: int | None = None,
) -> SamplingParams:
    """The request's SamplingParams (the model's generation defaults under what the request sets),
    streaming deltas; a 400 naming the request field for every bad value."""
    # Beam search scores the raw log-probabilities: the model's sampling defaults (temperature, top_p,
    # ...) do not apply, and an unset temperature is 0 (vLLM's rule).
    beam = bool(req.use_beam_search)
    kw: dict[str, Any] = {"temperature": 0.0} if beam else dict(state.sampling_defaults)
    for name in _SAME_NAME:
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.logit_bias:
        bias: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            # A token id as JSON writes it, "5": int() alone also takes " 5", "05", "0_5" and "٥", so
            # {"5": 10, "05": -10} named one token twice and one bias was silently dropped.
            try:
                tok = int(key)
            except ValueError:
                tok = None
            if tok is None or str(tok) != key:
                raise bad_request(
                    f'logit_bias keys must be token ids written as decimal integers ("5"); got {key!r}',
                    param="logit_bias",
                )
            bias[tok] = value
        kw["logit_bias"] = bias
    kw["max_tokens"] = max_tokens
    kw["logprobs"] = logprobs
    kw["prompt_logprobs"] = prompt_logprobs
    if best_of is not None:
        kw["best_of"] = best_of
    if beam:
        kw["use_beam_search"] = True
    # Passed on with or without beam search: SamplingParams refuses them, by name, when they would be
    # ignored (set without use_beam_search), rather than have them dropped here.
    if req.length_penalty is not None:
        kw["length_penalty"] = req.length_penalty
    if req.early_stopping is not None:
        kw["early_stopping"] = req.early_stopping
    # Streams read only what each output adds; collected responses read the finished output, which
    # holds the whole sequence either way.
    kw["output_kind"] = "delta"
    try:
        return SamplingParams(**kw)
    except ValueError as exc:
        raise error_from_invalid(exc, names) from None


def error_from_refusal(exc: Exception, names: FieldNames) -> APIError | None:
    """The envelope for an engine refusal (bad input, full queue, draining, dead); None for a bug."""
    if isinstance(exc, ValueError):
        return error_from_invalid(exc, names)
    return error_from_engine(exc)


def error_from_invalid(exc: ValueError, names: FieldNames) -> APIError:
    """A 400 for input the engine refused, naming the route's field."""
    if isinstance(exc, ContextLengthError):
        return context_length_error(exc.prompt_tokens, exc.max_model_len, exc.max_tokens, names)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=names.of(exc.param), code="invalid_value")
    err = error_from_value_error(exc, SAMPLING_FIELDS)
    err.param = names.of(err.param)
    return err


def context_length_error(
    num_prompt_tokens: int, limit: int, max_tokens: int | None, names: FieldNames
) -> APIError:
    """OpenAI's wording, with both numbers and the route's field names."""
    prompt, max_field = names.prompt, names.max_tokens
    if max_tokens is None:
        return APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, the {prompt} has "
            f"{num_prompt_tokens} tokens, which leaves no room for the completion. Please shorten the "
            f"{prompt}.",
            param=prompt,
            code="context_length_exceeded",
        )
    return APIError(
        400,
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {prompt}, "
        f"{max_tokens} in {max_field}). Please reduce the length of the {prompt} or {max_field}.",
        param=max_field,
        code="context_length_exceeded",
    )
