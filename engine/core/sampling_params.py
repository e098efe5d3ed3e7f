"""Sampling parameters, with vLLM's names and defaults.

Validated once, at construction: every bad value raises InvalidRequestError (a ValueError) naming the
field and its allowed range, so the HTTP layer can turn it into a 400 without knowing the rules. What
depends on the model (vocabulary, context length, EOS) is resolved by the input processor, on its own
copy (engine/inputs/input_processor.py). Plain Python, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import InvalidRequestError

# Bounds that protect the server rather than express model limits; the HTTP layer reports them as-is.
MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024
OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables top-k; normalised to 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-N logprobs per generated token, plus the sampled token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    # "cumulative": an output after every step that adds tokens, with the whole sequence so far and
    # what the step added; "delta": an output after every step with only what it added, the whole
    # sequence once, when finished (the cheapest stream); "final_only": only the finished output
    # (what LLM.generate and non-streaming requests need). engine/outputs/output_processor.py.
    output_kind: str = "cumulative"
    # Beam search (vLLM v0's names): n beams, the n best finished hypotheses returned, as transformers'
    # generate(num_beams=n, num_return_sequences=n, do_sample=False, length_penalty, early_stopping)
    # (engine/core/beam_search.py). Greedy only; one final output.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    # Filled by the input processor (stop_token_ids plus EOS unless ignore_eos); not a user field.
    all_stop_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()
        self.all_stop_token_ids = frozenset(self.stop_token_ids)

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        _int_range("n", self.n, 1, MAX_N)
        if self.output_kind not in OUTPUT_KINDS:
            raise InvalidRequestError(
                "output_kind",
                f"output_kind must be one of {', '.join(OUTPUT_KINDS)}; got {self.output_kind!r}",
            )
        if self.best_of is not None:
            _int_range("best_of", self.best_of, self.n, MAX_N)
            # vLLM v0 refused best_of > 1 under greedy sampling: every sample would be the same
            # sequence. weir keeps its n > 1 greedy (best_of == n) as before and refuses only what
            # best_of adds, samples thrown away.
            if self.best_of > self.n and self.temperature < 1e-5:
                raise InvalidRequestError(
                    "best_of",
                    f"best_of must equal n ({self.n}) when using greedy sampling (temperature 0): "
                    f"every sample would be the same sequence; got best_of {self.best_of}",
                )
        _float_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float_range("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        _float_range("temperature", self.temperature, 0.0, 100.0)
        _float_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidRequestError(
                "top_k",
                f"top_k must be -1 (disabled), 0 (disabled) or a positive integer; got {self.top_k!r}",
            )
        _float_range("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _int_range("seed", self.seed, -(2**63), 2**63 - 1)
        if self.max_tokens is not None:
            _int_range("max_tokens", self.max_tokens, 1, 2**31 - 1)
        _int_range("min_tokens", self.min_tokens, 0, 2**31 - 1)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "min_tokens",
                f"min_tokens must be less than or equal to max_tokens ({self.max_tokens}); got {self.min_tokens}",
            )
        if self.logprobs is not None:
            _int_range("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _int_range("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop", "stop must be a string or a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                "stop", f"stop may hold at most {MAX_STOP_STRINGS} strings; got {len(self.stop)}"
            )
        for s in self.stop:
            if not s:
                raise InvalidRequestError("stop", "stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    "stop",
                    f"each stop string may be at most {MAX_STOP_STRING_CHARS} characters; got {len(s)}",
                )
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise InvalidRequestError(
                "stop_token_ids", "stop_token_ids must be a list of non-negative integers"
            )
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
                raise InvalidRequestError(
                    "logit_bias",
                    f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries; got {len(self.logit_bias)}",
                )
            for tok, bias in self.logit_bias.items():
                if tok < 0:
                    raise InvalidRequestError(
                        "logit_bias", f"logit_bias keys must be non-negative token ids; got {tok}"
                    )
                _float_range(f"logit_bias[{tok}]", bias, -100.0, 100.0, param="logit_bias")
        if self.use_beam_search:
            self._validate_beam_search()
        else:
            # As vLLM v0: beam search's own fields change nothing without it, so a value other than the
            # default is refused by name rather than accepted and silently ignored.
            if self.early_stopping is not False:
                raise InvalidRequestError(
                    "early_stopping",
                    f"early_stopping is only used by beam search (use_beam_search); without it leave "
                    f"early_stopping out or false; got {self.early_stopping!r}",
                )
            if self.length_penalty != 1.0:
                raise InvalidRequestError(
                    "length_penalty",
                    f"length_penalty is only used by beam search (use_beam_search); without it leave "
                    f"length_penalty out or 1.0; got {self.length_penalty!r}",
                )

    def _validate_beam_search(self) -> None:
        """What beam search supports: deterministic scoring of the raw log-probabilities (as
        transformers' beam search without logits processors). Each field that would change them, or
        that has no meaning for beams, is refused by name."""
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise InvalidRequestError(
                "early_stopping",
                f'early_stopping must be true, false or "never"; got {self.early_stopping!r}',
            )
        _float_range("length_penalty", self.length_penalty, -100.0, 100.0)
        if not self.greedy:
            raise InvalidRequestError(
                "temperature",
                f"beam search needs temperature 0 (it is deterministic); got {self.temperature}",
            )
        refused = {
            "best_of": self.best_of is not None and self.best_of != self.n,
            "top_p": self.top_p < 1.0,
            "top_k": self.top_k > 0,
            "min_p": self.min_p > 0.0,
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "logit_bias": bool(self.logit_bias),
            "min_tokens": self.min_tokens > 0,
            "logprobs": self.logprobs is not None,
            "prompt_logprobs": self.prompt_logprobs is not None,
        }
        for name, bad in refused.items():
            if bad:
                raise InvalidRequestError(name, f"{name} is not supported with beam search (use_beam_search)")

    def validate_against_vocab(self, vocab_size: int) -> None:
        """Token ids named by the user must exist in the model's vocabulary."""
        for tok in self.stop_token_ids or []:
            if tok >= vocab_size:
                raise InvalidRequestError(
                    "stop_token_ids",
                    f"stop_token_ids contains {tok}, outside the vocabulary [0, {vocab_size})",
                )
        for tok in self.logit_bias or {}:
            if tok >= vocab_size:
                raise InvalidRequestError(
                    "logit_bias",
                    f"logit_bias contains token id {tok}, outside the vocabulary [0, {vocab_size})",
                )

    # ---------------------------------------------------------------- derived
    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def num_sequences(self) -> int:
        """Sequences generated: best_of (defaults to n); the n with the highest cumulative logprob
        are returned."""
        return self.best_of if self.best_of is not None else self.n

    def copy(self) -> SamplingParams:
        """A shallow copy, without re-validating (the input processor resolves fields of its own copy)."""
        clone = SamplingParams.__new__(SamplingParams)
        for name in SamplingParams.__slots__:
            setattr(clone, name, getattr(self, name))
        return clone

    def clone_for_child(self, seed_offset: int) -> SamplingParams:
        """Params for one of the n (or best_of) sequences of a parallel-sampling request (n=1, seed
        shifted). With best_of > n every child asks the sampler for its chosen token's logprob
        (logprobs=0 unless more were asked): the n best are picked by cumulative logprob. Only these
        requests pay for it."""
        child = self.copy()
        if self.best_of is not None and self.best_of > self.n and self.logprobs is None:
            child.logprobs = 0
        child.n = 1
        child.best_of = None
        if self.seed is not None:
            child.seed = self.seed + seed_offset
        return child


def _int_range(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(name, f"{name} must be an integer; got {value!r}")
    if not low <= value <= high:
        raise InvalidRequestError(name, f"{name} must be in [{low}, {high}]; got {value}")


def _float_range(
    name: str, value: object, low: float, high: float, low_open: bool = False, param: str | None = None
) -> None:
    param = param or name
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise InvalidRequestError(param, f"{name} must be a number; got {value!r}")
    if low_open:
        if not (low < value <= high):
            hi = "inf)" if math.isinf(high) else f"{high}]"
            raise InvalidRequestError(param, f"{name} must be in ({low}, {hi}; got {value}")
    elif not low <= value <= high:
        raise InvalidRequestError(param, f"{name} must be in [{low}, {high}]; got {value}")
