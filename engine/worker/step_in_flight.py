"""A launched step whose sampled token ids may still be on the device.

Async scheduling overlaps the host's work for step N+1 (schedule, build inputs, launch) and for step
N's results (update, detokenize, stream) with the GPU's work. The runner returns a `StepInFlight` as
soon as step N's kernels are queued: its sampled ids are copied to pinned host memory without
blocking, and `result()` waits for that copy only when the host actually needs the ids. Meanwhile the
next step reads the same ids straight from `sampled` on the device (`scatter_rows` puts them into its
input ids), so decoding never waits for a device-to-host round trip.

`result()` appends the ids to the runner's per-request state objects it sampled for (objects, not
ids: a request finished and replaced while the step was in flight cannot get a stale token) and is
idempotent, so the runner may resolve a step early (a penalty needs the ids) and the step pipeline later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.core.scheduler_output import BeamCandidates, DeviceBeamResults, ModelRunnerOutput
from engine.worker.sampler import Sampler, SamplingMetadata


class SampledState(Protocol):
    """What a step appends its sampled token to (the runner's per-request state)."""

    req_id: str
    token_ids: list[int]
    output_token_ids: list[int]
    appends_sampled: bool  # False: the engine picks the token (beam search) and sends it back


@dataclass(slots=True, eq=False)
class StepInFlight:
    output: ModelRunnerOutput  # filled by result(); prompt logprobs are already in it
    # The rest is None / empty for a step that sampled nothing (prefill chunks only).
    sampled: torch.Tensor | None = None  # [num_sampled] int64, on the device
    row_of: dict[str, int] = field(default_factory=dict)  # req_id -> row of `sampled`
    states: Sequence[SampledState] = ()  # [num_sampled] the state each row samples for
    metadata: SamplingMetadata | None = None
    _host_ids: torch.Tensor | None = None  # [num_sampled] int64 (pinned on CUDA)
    _host_logprobs: torch.Tensor | None = None  # [L, 2 + 2N] float64 (pinned on CUDA)
    _ready: torch.cuda.Event | None = None  # recorded after the copies (CUDA only)
    # The step launched before this one, until it is resolved: steps append tokens to the same
    # states, so they must be resolved in launch order whoever asks first.
    previous: StepInFlight | None = None
    done: bool = False
    # Device-ranked beam groups' candidates (engine/worker/beam_device.py): group ids, candidates per
    # group, and the [sum, 3] float64 buffer (on the host, pinned, once copied).
    _beam_groups: tuple[list[str], list[int]] | None = None
    _host_beams: torch.Tensor | None = None

    def _copy_beams(self, beams: tuple[list[str], list[int], torch.Tensor] | None) -> None:
        if beams is None:
            return
        group_ids, counts, candidates = beams
        self._beam_groups = (group_ids, counts)
        on_cuda = candidates.device.type == "cuda"
        self._host_beams = _to_host_async(candidates) if on_cuda else candidates

    @classmethod
    def launch_beams(
        cls,
        output: ModelRunnerOutput,
        beams: tuple[list[str], list[int], torch.Tensor] | None,
        previous: StepInFlight | None = None,
    ) -> StepInFlight:
        """A step that sampled nothing but may have ranked device beam groups."""
        if beams is None:
            return cls.finished(output)
        step = cls(output=output, previous=previous if previous is not None and not previous.done else None)
        step._copy_beams(beams)
        if beams[2].device.type == "cuda":
            step._ready = torch.cuda.Event()
            step._ready.record()
        return step

    @classmethod
    def launch(
        cls,
        output: ModelRunnerOutput,
        sampled: torch.Tensor,  # [num_sampled] int64
        packed_logprobs: torch.Tensor | None,  # [L, 2 + 2N] float64
        states: Sequence[SampledState],
        metadata: SamplingMetadata,
        previous: StepInFlight | None = None,
        beams: tuple[list[str], list[int], torch.Tensor] | None = None,
    ) -> StepInFlight:
        """Start copying the step's results to the host without waiting for them (`beams`: the
        device-ranked groups' candidates, DeviceBeamPool.rank)."""
        step = cls(
            output=output,
            sampled=sampled,
            row_of={s.req_id: i for i, s in enumerate(states)},
            states=states,
            metadata=metadata,
            previous=previous if previous is not None and not previous.done else None,
        )
        step._copy_beams(beams)
        if sampled.device.type == "cuda":
            step._host_ids = _to_host_async(sampled)
            if packed_logprobs is not None:
                step._host_logprobs = _to_host_async(packed_logprobs)
            step._ready = torch.cuda.Event()
            step._ready.record()
        else:
            step._host_ids = sampled
            step._host_logprobs = packed_logprobs
        return step

    @classmethod
    def finished(cls, output: ModelRunnerOutput) -> StepInFlight:
        """A step with nothing left on the device (nothing was sampled)."""
        return cls(output=output, done=True)

    def result(self) -> ModelRunnerOutput:
        """Wait for the sampled ids (if not here yet), append them to the request states, return the
        step's output. Resolves the step before it first. Idempotent."""
        if self.done:
            return self.output
        if self.previous is not None:
            self.previous.result()
            self.previous = None
        if self._ready is not None:
            self._ready.synchronize()
        out = self.output
        if self._beam_groups is not None:
            assert self._host_beams is not None
            group_ids, counts = self._beam_groups
            out.device_beams = DeviceBeamResults(group_ids, counts, self._host_beams.numpy().tobytes())
            self._beam_groups = self._host_beams = None
        if self._host_ids is None:  # only device beam groups ran
            self.done = True
            self._ready = None
            return out
        assert self.metadata is not None
        ids: list[int] = self._host_ids.tolist()
        host_lp = self._host_logprobs
        beams = [i for i, s in enumerate(self.states) if not s.appends_sampled]
        if beams and host_lp is not None:
            # Beams' candidates stay arrays (the engine ranks them with numpy), not a list per row.
            out.beam_candidates = self._beam_candidates(beams, host_lp)
            if len(beams) == host_lp.shape[0]:
                host_lp = None  # only beams asked for logprobs
        packed = host_lp.tolist() if host_lp is not None else []
        sampler_output = Sampler.to_output(ids, packed, self.metadata, set(beams))
        for state, token, lp in zip(self.states, ids, sampler_output.logprobs, strict=True):
            if state.appends_sampled:
                state.token_ids.append(token)
                state.output_token_ids.append(token)
            out.sampled_token_ids[state.req_id] = [token]
            if lp is not None:
                out.logprobs[state.req_id] = lp
        # The device tensor may go: a step that read it was queued on the same stream before now,
        # and the caching allocator reuses memory in stream order.
        self.done = True
        self.sampled = None
        self._host_ids = self._host_logprobs = None
        self._ready = None
        return out

    def _beam_candidates(self, beams: list[int], packed: torch.Tensor) -> BeamCandidates:
        """Rows `beams` of the batch (beams, which all asked for logprobs) out of `packed`
        ([L, 2 + 2N] float64: chosen logprob, rank, N top logprobs, N top ids; see Sampler.sample)."""
        md = self.metadata
        assert md is not None and md.max_num_logprobs is not None
        width = md.max_num_logprobs
        rows = Sampler.packed_rows(md, beams)
        sub = packed if len(rows) == packed.shape[0] else packed[rows]  # [R, 2 + 2N]
        return BeamCandidates(
            req_ids=[self.states[i].req_id for i in beams],
            num_top=width,
            token_ids=sub[:, 2 + width : 2 + 2 * width].to(torch.int64).numpy().tobytes(),
            logprobs=sub[:, 2 : 2 + width].contiguous().numpy().tobytes(),
        )


def _to_host_async(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def scatter_rows(input_ids: torch.Tensor, dst: list[int], sampled: torch.Tensor, src: list[int]) -> None:
    """input_ids[dst] = sampled[src] on the device: feed tokens still in flight to the next step.

    In steady decoding the batch keeps its order, so both index lists are 0..k-1: one slice copy,
    no index tensors to transfer.
    """
    k = len(dst)
    if dst[0] == 0 and src[0] == 0 and dst[-1] == k - 1 and src[-1] == k - 1 and dst == src == list(range(k)):
        input_ids[:k].copy_(sampled[:k])
        return
    index = torch.tensor([dst, src], dtype=torch.int64)
    if input_ids.device.type == "cuda":
        index = index.pin_memory().to(input_ids.device, non_blocking=True)
    input_ids[index[0]] = sampled[index[1]]
