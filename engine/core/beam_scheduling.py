"""The scheduler's side of beam search: a beam group's beams enter, fork and grow here. Plain Python.

A beam search of width k is k Requests ("beams", `Request.is_beam`). The first computes the prompt; the
others wait outside the queue until the first step of the search forks them. After every step the
engine's beam search (engine/beam_search.py) gives each beam its next token: a beam that continues its
own sequence gets the token appended (sent to the runner as `new_token_ids`); a beam slot that takes
another beam's sequence (its own beam died, or was never used) drops its blocks and forks that beam's
blocks by reference, copy-on-write (sent to the runner as the parent's row plus its new token,
ForkedRequestData, or whole, as a new request, if the parent was preempted meanwhile). A beam is scheduled
only once its last step's results are applied (Scheduler.schedule), since its next token depends on
the whole group's.

A mixin of Scheduler, over its state: kept apart so the scheduler's own file stays about scheduling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.core.request import Request, RequestStatus
from engine.core.scheduler_output import ForkedRequestData

if TYPE_CHECKING:
    from engine.core.kv_cache_manager import KVCacheManager


class BeamScheduling:
    requests: dict[str, Request]
    running: dict[str, Request]
    _waiting: dict[str, Request]
    _arrival_seq: dict[str, int]
    _next_seq: int
    _beam_resend: set[str]
    _beam_new_tokens: dict[str, list[int]]
    _beam_parent: dict[str, tuple[Request, int]]
    kv_cache_manager: KVCacheManager

    if TYPE_CHECKING:  # Scheduler's

        def add_request(self, request: Request) -> None: ...
        def _enqueue(self, request: Request) -> None: ...
        def _remove_waiting(self, request: Request) -> None: ...

    def add_beam_group(self, beams: list[Request]) -> None:
        """Enqueue beams[0] (it computes the prompt); the others wait for the first step to fork them."""
        for beam in beams[1:]:
            if beam.req_id in self.requests:
                raise ValueError(f"request id {beam.req_id!r} is already in use")
        self.add_request(beams[0])
        for beam in beams[1:]:
            beam.status = RequestStatus.WAITING
            self.requests[beam.req_id] = beam
            self._arrival_seq[beam.req_id] = self._next_seq
            self._next_seq += 1

    def extend_beam(self, beam: Request, token_id: int) -> None:
        """The beam continues its own sequence with `token_id`."""
        beam.append_output_token(token_id)
        if beam.req_id in self.running and beam.req_id not in self._beam_resend:
            self._beam_new_tokens.setdefault(beam.req_id, []).append(token_id)

    def fork_beam(self, beam: Request, parent: Request, output_token_ids: list[int]) -> None:
        """`beam` becomes `parent`'s sequence extended to `output_token_ids` (a new list, which the beam
        takes): its own blocks are freed and it shares the parent's, copy-on-write. Call before the
        parent itself is extended."""
        kv = self.kv_cache_manager
        if beam.req_id in self._waiting:
            self._remove_waiting(beam)
        forks = parent.status == RequestStatus.RUNNING and parent.req_id in kv.req_to_blocks
        if forks:
            kv.refork(beam, parent, parent.num_computed_tokens)  # free(beam), then fork
        else:
            kv.free(beam)
        self._forget_beam_diffs(beam)
        beam.output_token_ids = output_token_ids
        beam.all_token_ids = beam.prompt_token_ids + output_token_ids
        beam.block_hashes = list(parent.block_hashes)
        if forks:
            beam.num_computed_tokens = parent.num_computed_tokens
            beam.status = RequestStatus.RUNNING
            if beam.first_scheduled_time is None:
                beam.first_scheduled_time = parent.first_scheduled_time
            self.running[beam.req_id] = beam  # a slot already running keeps its place
            self._beam_resend.add(beam.req_id)
            # The runner may build it from the parent's row (what the parent has computed so far).
            self._beam_parent[beam.req_id] = (parent, parent.num_tokens)
        else:
            # The parent was preempted (its blocks are gone): the beam recomputes, like it.
            self.running.pop(beam.req_id, None)
            beam.num_computed_tokens = 0
            beam.status = RequestStatus.PREEMPTED
            self._enqueue(beam)

    def _num_beams_not_running(self, beam: Request) -> int:
        return sum(1 for b in beam.group or (beam,) if b.status != RequestStatus.RUNNING)

    def _forget_beam_diffs(self, beam: Request) -> None:
        self._beam_resend.discard(beam.req_id)
        self._beam_new_tokens.pop(beam.req_id, None)
        self._beam_parent.pop(beam.req_id, None)

    def _fork_data(self, beam: Request, preempted: list[Request]) -> ForkedRequestData | None:
        """`beam` (re-sent after a fork) as its parent's row plus its own tokens, if the runner still
        holds the parent as it was at the fork (running, not preempted in this step); else None (it
        goes whole)."""
        parent, num_parent_tokens = self._beam_parent.pop(beam.req_id, (None, 0))
        if (
            parent is None
            or self.running.get(parent.req_id) is not parent
            or any(p is parent for p in preempted)
            or beam.num_tokens < num_parent_tokens
        ):
            return None
        return ForkedRequestData(
            req_id=beam.req_id,
            parent_req_id=parent.req_id,
            num_parent_tokens=num_parent_tokens,
            new_token_ids=beam.all_token_ids[num_parent_tokens:],
            block_ids=self.kv_cache_manager.get_block_ids(beam.req_id),
            num_computed_tokens=beam.num_computed_tokens,
        )
