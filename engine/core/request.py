"""A generation request as the scheduler and KV cache manager see it. Plain Python, no torch.

Scheduling is in tokens, not phases: a request is `all_token_ids` (prompt + outputs so far) and
`num_computed_tokens` (how many of them have KV in the cache). Prefill, chunked prefill, decode,
prefix-cache hits and recompute after preemption are all the same rule: compute the tokens from
`num_computed_tokens` up to `num_tokens`. With async scheduling the bound is
`num_tokens_with_placeholders`: a decode may be scheduled for the token that the step in flight
is still sampling (the runner feeds it from the device).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.lora.request import LoRARequest


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # back in the waiting queue, its blocks freed; recomputed when rescheduled
    FINISHED_STOPPED = 3  # EOS, a stop token or a stop string
    FINISHED_LENGTH = 4  # max_tokens or max_model_len
    FINISHED_ABORTED = 5  # cancelled by the client or the server
    FINISHED_ERROR = 6  # the forward pass failed for this request

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)
class Request:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower value is served first; ties keep arrival order
    # Extra keys mixed into the prefix-cache hash of every block (adapter id, cache salt), so two
    # requests only share blocks when the KV they hold would be identical.
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None  # None: the base model
    # The sequences of one parallel-sampling or beam-search request (the same list object in each of
    # them; None for a request alone). They share the prompt: the scheduler forks a running sibling's
    # prompt blocks copy-on-write rather than computing the prompt again.
    group: list[Request] | None = None
    # A beam of a beam search: the engine's beam search (engine/core/beam_search.py), not the
    # scheduler, appends its tokens and ends it, so it is scheduled only once its last step is applied.
    is_beam: bool = False

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens that steps already launched will sample but whose ids are not known yet (async
    # scheduling: step N+1 is scheduled while step N runs). 0 or 1 between steps; the scheduler
    # counts them as known tokens when it hands out work, and the update removes them.
    num_output_placeholders: int = 0
    # Prompt tokens found in the prefix cache at first scheduling (reported as cached_tokens).
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    # Chained block hashes of the full blocks of all_token_ids, extended as tokens arrive.
    block_hashes: list[bytes] = field(default_factory=list)
    stop_reason: int | str | None = None
    # Timestamps (time.monotonic) for metrics.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def lora_int_id(self) -> int:
        """The adapter's id; 0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
