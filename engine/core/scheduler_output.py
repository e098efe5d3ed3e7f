"""The one contract between the scheduler and the model runner.

The runner keeps per-request state between steps (token ids, block table, sampling params), so
requests it has seen before arrive as a small diff. Plain data, no torch and no live scheduler
objects: both directions pickle, so the same contract can cross a thread, a process or a Ray actor
(engine/executor/executor.py); the tensor-parallel executors send them as msgpack
(engine/executor/step_codec.py, whose wire layout follows these fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.sampling_params import SamplingParams
from engine.lora.request import LoRARequest


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has no state for: first scheduling, or rescheduling after preemption."""

    req_id: str
    token_ids: list[int]  # prompt + any outputs generated before a preemption
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int  # tokens already in the KV cache (prefix-cache hits, a fork)
    # A beam of a beam search: the runner does not append what it samples (the engine picks the
    # beams' tokens and sends them as new_token_ids).
    is_beam: bool = False
    lora_request: LoRARequest | None = None  # the adapter it runs with (None: the base model)


@dataclass(slots=True)
class ForkedRequestData:
    """A beam that took another beam's sequence (beam search), where the runner holds that beam (the
    parent): its tokens are the parent's first `num_parent_tokens` plus `new_token_ids`, so the
    runner copies the parent's row instead of receiving the whole sequence again."""

    req_id: str
    parent_req_id: str
    num_parent_tokens: int
    new_token_ids: list[int]
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: what changed since the last step."""

    req_id: str
    new_block_ids: list[int]  # appended to its block table
    num_computed_tokens: int
    # Tokens appended outside the runner (beam search: the engine picks them, not the sampler).
    new_token_ids: list[int] = field(default_factory=list)
    # Copy-on-write: (index in its block table, the block that replaces it), before new_block_ids.
    cow: tuple[int, int] | None = None


@dataclass(slots=True)
class DeviceBeamStart:
    """A beam group's first step ranked on the device (engine/core/beam_device.py): what the runner
    needs to set up its rows. Every beam reads the prompt's KV: `prompt_full_blocks` (the prompt's
    leading full blocks, shared by every beam) and `prompt_tail_block` (the block of the prompt's last
    token, which each beam copies into its own tail)."""

    prompt_full_blocks: list[int]
    prompt_tail_block: int
    token_ids: list[int]  # [width] each beam's first generated token (the host ranked the prompt)
    scores: list[float]  # [width] their float32 scores (cumulative log-probabilities)
    stop_token_ids: list[int]  # candidates ending in one of these hit a stopping criterion
    num_candidates: int  # candidates ranked per step (transformers' max(2, 1 + stops) x width)
    lora_request: LoRARequest | None = None  # the adapter every beam runs with (None: the base model)


@dataclass(slots=True)
class DeviceBeamStep:
    """One step of a beam group whose ranking runs on the device: `width` rows, one token each, at
    `position`. Everything here follows from the group's own blocks and its step count, so the
    scheduler sends it without knowing which beam the device chose for which row: each row's input
    token, its full blocks and its tail's content come from the device's ranking of the step before
    (engine/worker/beam_device.py)."""

    group_id: str
    width: int
    position: int  # the position every row computes this step
    tail_blocks: list[int]  # [width] each row's own tail block this step (the block of `position`)
    # [width] at a block boundary (position % block_size == 0): each row's copy of its parent's last
    # tail, now a full block of its table; empty otherwise.
    full_blocks: list[int]
    start: DeviceBeamStart | None = None  # set on the group's first device step


@dataclass(slots=True)
class DeviceBeamResults:
    """Each device-ranked group's step, as one buffer: for group g, `num_candidates[g]` rows of
    (score, parent row, token id), in the device's ranked order (the host replays it exactly)."""

    group_ids: list[str]
    num_candidates: list[int]
    candidates: bytes  # [sum(num_candidates), 3] float64, native byte order


@dataclass(slots=True)
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    # req_id -> tokens to compute this step, for every scheduled request (new and cached).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests whose runner state must be dropped: finished, aborted or preempted since last step.
    finished_req_ids: set[str]
    preempted_req_ids: set[str] = field(default_factory=set)
    # Which schedule() made this step (1, 2, ...; 0 for one built by hand). The scheduler keeps its
    # own Request of every id it scheduled under this number, so results are matched to the request
    # they were computed for even if it finished (and its id was reused) while the step was in flight.
    step_id: int = 0
    # How many of total_num_scheduled_tokens are prompt tokens (the rest recompute or extend outputs).
    num_prompt_tokens: int = 0
    # Copy-on-write: (src, dst) block ids whose KV the runner copies before this step's forward pass.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Beams forked from a beam the runner holds, applied after new_requests (a parent may be one).
    forked_requests: list[ForkedRequestData] = field(default_factory=list)
    # Beam groups ranked on the device (engine/core/beam_device.py): rows after every request above,
    # counted in total_num_scheduled_tokens but not in num_scheduled_tokens.
    beam_steps: list[DeviceBeamStep] = field(default_factory=list)
    # Device-ranked groups that ended: the runner drops their rows' state.
    finished_beam_groups: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs at one position: the top-N token ids/logprobs (rank order) plus the chosen token."""

    token_ids: list[int]  # [N] top-N, most likely first
    logprobs: list[float]  # [N]
    chosen_token_id: int
    chosen_logprob: float
    chosen_rank: int  # 1-based rank of the chosen token in the full distribution


@dataclass(slots=True)
class BeamCandidates:
    """The top candidates of a step's beams (beam search), as two raw buffers rather than a
    TokenLogprobs per beam: the engine ranks every group's candidates with a few numpy calls
    (engine/core/beam_ranking.py), so Python lists per beam would only be unpacked again. Row i is
    the beam `req_ids[i]`'s `num_top` most likely next tokens, best first (a beam that asked for
    fewer uses the first columns)."""

    req_ids: list[str]
    num_top: int
    token_ids: bytes  # [len(req_ids), num_top] int64, native byte order
    logprobs: bytes  # [len(req_ids), num_top] float64 (float32 values, exact)


@dataclass(slots=True)
class ModelRunnerOutput:
    # req_id -> sampled token ids this step ([] for a prefill chunk that did not reach the end).
    sampled_token_ids: dict[str, list[int]]
    # req_id -> logprobs of the sampled token, for requests that asked for logprobs (beams excepted).
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # req_id -> logprobs of the prompt positions computed this step (position i scores token i+1);
    # the first prompt token has no logprob and is never included.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # The beams' candidates (None when the step ran no beam).
    beam_candidates: BeamCandidates | None = None
    # The device-ranked beam groups' candidates (None when the step ran none).
    device_beams: DeviceBeamResults | None = None
