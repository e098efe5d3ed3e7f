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

A group may instead be ranked on the device after its first step (engine/core/beam_device.py):
`start_device_group` takes its rows' tail blocks, and the scheduler then sends its steps without
waiting, taking each boundary's copies as it goes.

A mixin of Scheduler, over its state: kept apart so the scheduler's own file stays about scheduling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.core.beam_device import DeviceBeamGroup, new_device_group
from engine.core.block_pool import KVCacheBlock
from engine.core.request import Request, RequestStatus
from engine.core.scheduler_output import DeviceBeamStart, DeviceBeamStep, ForkedRequestData

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
    block_size: int
    max_num_seqs: int
    beam_device_ranking: bool
    # Device-ranked groups by their leader's req_id; seats their other beams take (not in `running`);
    # groups that ended since the last schedule() (the runner drops their rows).
    _device_groups: dict[str, DeviceBeamGroup]
    _device_seats: int
    _finished_beam_groups: list[str]
    _next_group_serial: int
    num_preemptions: int
    # Called with a device-ranked group's leader when the group starts again from its prompt (the
    # engine's beam search resets its ranking); set by engine/beam_search.py.
    on_device_group_restart: Callable[[Request], None] | None

    if TYPE_CHECKING:  # Scheduler's

        def _pick_victim(self) -> Request | None: ...
        def _preempt(self, request: Request) -> None: ...
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

    # ------------------------------------------------------------ groups ranked on the device
    def start_device_group(
        self,
        slots: list[Request],
        token_ids: list[int],
        scores: list[float],
        stop_token_ids: list[int],
        num_candidates: int,
    ) -> str | None:
        """Rank the rest of the group whose first step the host ranked (`token_ids`, `scores`: its
        running beams, best first) on the device. Returns the group's id, or None when it cannot (off,
        the leader not running with its prompt computed, or too few free blocks for its 2 x width
        tails): the host then forks its beams as before."""
        leader = slots[0]
        kv = self.kv_cache_manager
        params = leader.sampling_params
        assert params.max_tokens is not None  # resolved by the input processor
        prompt_len = leader.num_prompt_tokens
        if (
            not self.beam_device_ranking
            or params.max_tokens < 2
            or leader.status != RequestStatus.RUNNING
            or leader.num_computed_tokens != prompt_len
            or leader.num_output_placeholders
            or any(s.status == RequestStatus.RUNNING for s in slots[1:])
        ):
            return None
        width = len(token_ids)
        blocks = kv.get_block_ids(leader.req_id)
        if len(blocks) * self.block_size < prompt_len or 2 * width > kv.block_pool.num_free_blocks:
            return None
        tails = kv.block_pool.allocate(2 * width)
        tail_index = (prompt_len - 1) // self.block_size
        start = DeviceBeamStart(
            prompt_full_blocks=blocks[:tail_index],
            prompt_tail_block=blocks[tail_index],
            token_ids=list(token_ids),
            scores=list(scores),
            stop_token_ids=list(stop_token_ids),
            num_candidates=num_candidates,
            lora_request=leader.lora_request,
        )
        group_id = f"{leader.req_id}@{self._next_group_serial}"
        self._next_group_serial += 1
        group = new_device_group(group_id, leader, slots, tails, self.block_size, start, params.max_tokens)
        self._device_groups[leader.req_id] = group
        self._device_seats += width - 1
        for beam in slots[1:]:
            if beam.req_id in self._waiting:
                self._remove_waiting(beam)
        return group_id

    def _device_beam_steps(self, budget: int) -> tuple[list[DeviceBeamStep], int, list[Request]]:
        """This step's device-ranked group steps (decodes: scheduled first), the budget left, and the
        requests preempted for their boundary copies."""
        steps: list[DeviceBeamStep] = []
        preempted: list[Request] = []
        num_groups = len(self._device_groups)
        for group in list(self._device_groups.values()):
            if group.leader.req_id not in self._device_groups:
                continue  # started again from its prompt for a group before it
            if budget < group.width or not group.has_step_left:
                continue
            copies = []
            if group.next_is_boundary:
                copies = self._take_copies(group, preempted)
                if copies is None:
                    continue  # it waits for blocks (or started again)
            steps.append(group.next_step(copies))
            budget -= group.width
        if num_groups != len(self._device_groups):
            # A group given its step started again for a later one's copies: its step goes too.
            live = {g.group_id for g in self._device_groups.values()}
            kept = [s for s in steps if s.group_id in live]
            budget += sum(s.width for s in steps) - sum(s.width for s in kept)
            steps = kept
        return steps, budget, preempted

    def _take_copies(self, group: DeviceBeamGroup, preempted: list[Request]) -> list[KVCacheBlock] | None:
        """`width` fresh blocks for a boundary step: requests ranked the host's way are preempted
        for them; if none is left, the device-ranked group that arrived last starts again (None)."""
        pool = self.kv_cache_manager.block_pool
        while pool.num_free_blocks < group.width:
            victim = self._pick_victim()
            if victim is not None:
                self._preempt(victim)
                preempted.append(victim)
                continue
            last = max(self._device_groups.values(), key=lambda g: self._arrival_seq[g.leader.req_id])
            self._restart_device_group(last)
            preempted.append(last.leader)
            if last is group:
                return None
        return pool.allocate(group.width)

    def advance_device_group(self, leader: Request, parents: list[int]) -> None:
        """The host replayed a step of the group: its next rows continue rows `parents`; the boundary
        copies no row holds any more go back to the pool."""
        group = self._device_groups.get(leader.req_id)
        if group is not None:
            dropped = group.advance(parents)
            if dropped:
                self.kv_cache_manager.block_pool.free_blocks(dropped)

    def _release_device_group(self, leader: Request) -> None:
        """The group of `leader` (if device-ranked) ends or starts again: its tails and boundary copies
        go back, the runner drops its rows."""
        group = self._device_groups.pop(leader.req_id, None)
        if group is None:
            return
        self._device_seats -= group.width - 1
        pool = self.kv_cache_manager.block_pool
        pool.free_blocks(group.copies)
        pool.free_blocks(reversed(group.tail_blocks))
        self._finished_beam_groups.append(group.group_id)

    def _restart_device_group(self, group: DeviceBeamGroup) -> None:
        """Preempt a device-ranked group: its blocks go back and its leader recomputes the prompt; the
        engine's beam search ranks it again from its first step, on the host."""
        leader = group.leader
        self._release_device_group(leader)
        callback = self.on_device_group_restart
        if callback is not None:
            callback(leader)
        self._preempt(leader)

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
