"""The one input processor: a prompt and its sampling parameters in, an immutable engine request out.

Everything about a request that can be wrong is checked here, once, against the model (vocabulary,
context length) and the KV cache (a request that could never fit); everything a later layer needs
resolved is resolved here (the prompt's token ids, max_tokens, the stop-token set with EOS). The
scheduler, the runner and the output processor trust what comes out and never change it.

Errors are InvalidRequestError / ContextLengthError (engine/errors.py): ValueErrors whose messages
start with the field at fault, so callers that only catch ValueError keep working.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.core.sampling_params import SamplingParams
from engine.core.sliding_window import max_blocks_held
from engine.errors import ContextLengthError, InvalidRequestError
from engine.inputs.tokenizer import encode_prompt
from engine.lora.request import LoRARequest


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A validated request. `sampling_params` is the processor's own copy with `max_tokens` and
    `all_stop_token_ids` resolved; neither it nor `prompt_token_ids` is modified after processing
    (by anyone: they are shared by the request's n sequences and every layer below)."""

    request_id: str
    prompt: str | None  # the text the prompt came from, when there was one
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    lora_request: LoRARequest | None = None  # the adapter it runs with (None: the base model)

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens  # type: ignore[return-value]  # resolved: never None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def check_request_types(request_id: object, params: object, priority: object) -> None:
    """The argument types the engine relies on, refused up front with the argument's name: a priority
    that is not an int went into the waiting heap and broke every later comparison there (the engine
    could never schedule again), a params object that is not SamplingParams failed as an
    AttributeError deep inside, and a request id that is not a str failed its request in the step."""
    if not isinstance(request_id, str):
        raise InvalidRequestError(
            "request_id", f"request_id must be a string; got {type(request_id).__name__} {request_id!r}"
        )
    if params is not None and not isinstance(params, SamplingParams):
        raise InvalidRequestError(
            "sampling_params", f"sampling_params must be a SamplingParams; got {type(params).__name__}"
        )
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise InvalidRequestError("priority", f"priority must be an integer; got {priority!r}")


class InputProcessor:
    """Validates and normalizes requests for one engine (its tokenizer, vocabulary and limits)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        max_model_len: int,
        block_size: int,
        num_kv_blocks: int,
        eos_token_ids: Iterable[int],
        max_best_of: int = 20,
        max_beam_width: int = 16,
        max_num_seqs: int | None = None,
        enable_lora: bool = False,
        sliding_window: int | None = None,
        max_chunk_tokens: int | None = None,
    ) -> None:
        """`sliding_window` (CacheConfig's) with `max_chunk_tokens` (SchedulerConfig's): a sequence of
        a model windowed on every layer holds only its window's blocks, so a longer one fits."""
        self.sliding_window = sliding_window
        self.max_chunk_tokens = max_chunk_tokens
        self.tokenizer = tokenizer
        self.max_beam_width = max_beam_width  # EngineConfig.max_beam_width
        self.max_num_seqs = max_num_seqs  # a beam group runs all its beams at once
        self.enable_lora = enable_lora
        self.max_best_of = max_best_of  # the server's bound on best_of > n (EngineConfig.max_best_of)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.eos_token_ids = frozenset(eos_token_ids)

    def process(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        prompt_text: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> EngineRequest:
        """`prompt` is text (tokenized here) or token ids; `prompt_text` is the text token ids came from,
        when the caller tokenized it already. The caller's `params` object is never modified, so one
        object can serve prompts of different lengths."""
        check_request_types(request_id, params, priority)
        if lora_request is not None:
            if not self.enable_lora:
                raise InvalidRequestError(
                    "lora_request",
                    f"lora_request names adapter {lora_request.lora_name!r}, but LoRA is off "
                    "(start the engine with enable_lora=True / --enable-lora)",
                )
            if not isinstance(lora_request, LoRARequest):
                raise InvalidRequestError("lora_request", f"must be a LoRARequest; got {lora_request!r}")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "prompt must not be empty")
            prompt_text = prompt
            prompt_token_ids = encode_prompt(self.tokenizer, prompt)
        elif isinstance(prompt, (list, tuple)):
            prompt_token_ids = list(prompt)
        else:
            # bytes would pass as token ids (list(b"hi") == [104, 105]), None or a dict fail deep in
            # list() or as "token id 'prompt'": name what a prompt may be.
            raise InvalidRequestError(
                "prompt", f"prompt must be a string or a list of token ids; got {type(prompt).__name__}"
            )
        self.validate_prompt_tokens(prompt_token_ids)
        params = params.copy() if params is not None else SamplingParams()
        if params.best_of is not None and params.best_of > max(params.n, self.max_best_of):
            raise InvalidRequestError(
                "best_of",
                f"best_of must be at most {self.max_best_of} (the server's max_best_of) when it is "
                f"greater than n; got {params.best_of}",
            )
        if params.use_beam_search:
            self._check_beam_width(params.n)
        params.validate_against_vocab(self.vocab_size)
        params.max_tokens = self._resolve_max_tokens(
            len(prompt_token_ids), params.max_tokens, params.n if params.use_beam_search else 1
        )
        if params.min_tokens > params.max_tokens:
            # Only when max_tokens was left unset (SamplingParams checks an explicit one): the rest of
            # the context is fewer tokens than min_tokens asks for, which could never be honoured.
            raise InvalidRequestError(
                "min_tokens",
                f"min_tokens must be at most the {params.max_tokens} tokens the context leaves after the "
                f"prompt ({len(prompt_token_ids)} of max_model_len {self.max_model_len} tokens); "
                f"got {params.min_tokens}",
            )
        stop_ids = frozenset(params.stop_token_ids or ())
        params.all_stop_token_ids = stop_ids if params.ignore_eos else stop_ids | self.eos_token_ids
        return EngineRequest(
            request_id=request_id,
            prompt=prompt_text,
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            priority=priority,
            cache_salt=cache_salt,
            lora_request=lora_request,
        )

    def validate_prompt_tokens(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("prompt", "prompt must not be empty")
        vocab_size = self.vocab_size
        # Fast path in C (a 1k-token prompt is checked per request on the event loop): all ints, in
        # range. Anything else takes the loop below, which names the first bad id.
        all_valid = set(map(type, prompt_token_ids)) == {int} and (
            0 <= min(prompt_token_ids) and max(prompt_token_ids) < vocab_size
        )
        if not all_valid:
            for tok in prompt_token_ids:
                if not isinstance(tok, int) or isinstance(tok, bool):
                    raise InvalidRequestError(
                        "prompt", f"prompt token ids must be integers; got {tok!r} ({type(tok).__name__})"
                    )
                if not 0 <= tok < vocab_size:
                    raise InvalidRequestError(
                        "prompt",
                        f"prompt contains token id {tok!r}, outside the vocabulary [0, {vocab_size})",
                    )
        if len(prompt_token_ids) >= self.max_model_len:
            raise ContextLengthError(len(prompt_token_ids), self.max_model_len)

    def _check_beam_width(self, width: int) -> None:
        limit = self.max_beam_width
        if self.max_num_seqs is not None and self.max_num_seqs < limit:
            limit, name = self.max_num_seqs, "max_num_seqs"
        else:
            name = "max_beam_width"
        if width > limit:
            raise InvalidRequestError(
                "n", f"beam search width (n) must be at most {limit} (the server's {name}); got {width}"
            )

    def _resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None, num_beams: int = 1) -> int:
        """max_tokens=None means up to the context length. Raises when the request could never fit
        the context or the whole KV cache (admitted, it would wait forever); a beam search's beams
        must fit together, each at its longest (sharing makes them smaller in practice; a group ranked
        on the device releases nothing behind a window). A sequence of a windowed model needs at most
        its window's blocks and a chunk's (engine/core/sliding_window.py)."""
        limit = self.max_model_len
        if max_tokens is None:
            max_tokens = limit - num_prompt_tokens  # > 0: validate_prompt_tokens ran
        elif num_prompt_tokens + max_tokens > limit:
            raise ContextLengthError(num_prompt_tokens, limit, max_tokens)
        total = num_prompt_tokens + max_tokens
        window = self.sliding_window if num_beams == 1 else None
        need = max_blocks_held(total, self.block_size, window, self.max_chunk_tokens or total) * num_beams
        if need > self.num_kv_blocks:
            beams = f" for each of {num_beams} beams" if num_beams > 1 else ""
            raise InvalidRequestError(
                "max_tokens",
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}){beams} needs {need} KV cache "
                f"blocks of {self.block_size} tokens, but the KV cache has only {self.num_kv_blocks} blocks",
            )
        return max_tokens
