"""Beam groups ranked on the device: the scheduler's side. Plain Python.

Without this, a beam group waits for its step's results on the host before its next step (the host
ranks the candidates, then forks the winners' blocks), so under async scheduling the groups of a batch
alternate in two halves, each half a forward pass over all the weights per token (B2 in
loadtest/bench_beam.py: ~0.74x of n=4 sampling on an H200). Here, once the host has ranked a group's
first step, the group's next steps are scheduled without waiting: the runner ranks each step's
candidates on the device (engine/worker/beam_device.py), moves every row to the beam it continues and
feeds it the chosen token, and the host replays each step's ranking one step later (the finished
hypotheses, the early-stopping rule) from the candidates the device sends back. One forward pass per
token for all beams, and the host off the critical path; a group that the host finds done has run
one step too many, which is dropped.

What the scheduler must still send each step follows from the group's length alone (every beam of a
group has the same length), not from the ranking:
- each row has two tail blocks of its own, used in turn: at step t a row copies its parent's tail of
  step t - 1 (the filled part) into its tail of step t and writes its token there, so a copy never
  reads a block that another row's copy of the same step writes. The group takes them when it starts
  (a group that cannot runs the host's way);
- at a block boundary the parent's last tail is full: each row copies it into a fresh block, taken
  from the pool when the step is scheduled, which becomes a full block of its table (full blocks are
  then shared by reference: the device gathers the rows' tables from their parents').
The host mirrors the rows' tables one step late, as it replays the ranking (`advance`), and frees the
copies no beam holds any more; so a group holds the prompt, each live beam's own blocks and one more
tail per beam. When the pool is short at a boundary, requests ranked the host's way are preempted
first; if none is left, the device-ranked group that arrived last starts again from its prompt (the
search is deterministic: the same beams come out) and is ranked on the host from then on.

Not on the device: stop strings (the text is the host's); such groups rank on the host
(engine/core/beam_scheduling.py). Under tensor parallelism every rank ranks the same gathered logits
the same way, so their pools agree; rank 0's candidates come back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.block_pool import KVCacheBlock
from engine.core.request import Request
from engine.core.scheduler_output import DeviceBeamStart, DeviceBeamStep


@dataclass(slots=True, eq=False)
class DeviceBeamGroup:
    group_id: str  # unique for the engine's lifetime: results of a dropped group never reach another
    leader: Request  # the beam that computed the prompt; it holds the prompt's blocks
    slots: list[Request]  # every beam Request of the group (finished together)
    width: int
    block_size: int
    tail_blocks: list[KVCacheBlock]  # [2 * width] the rows' tails, held until the group ends
    position: int  # the position the group's next step computes
    last_position: int  # the last position a step may compute (its token's successor is max_tokens')
    start: DeviceBeamStart | None  # sent with the first step
    num_steps: int = 0  # steps scheduled so far
    # The host's mirror of the rows' tables (their boundary copies; the prompt's blocks are the
    # leader's), as of step `mirrored` (the rows of the last step whose parents are known).
    tables: list[list[KVCacheBlock]] = field(default_factory=list)
    mirrored: int = 1  # the host ranked the prompt: step 1's rows are known
    pending: dict[int, list[KVCacheBlock]] = field(
        default_factory=dict
    )  # step -> its copies, past `mirrored`
    copies: set[KVCacheBlock] = field(default_factory=set)  # every boundary copy not freed yet

    def __post_init__(self) -> None:
        self.tables = [[] for _ in range(self.width)]

    @property
    def has_step_left(self) -> bool:
        return self.position <= self.last_position

    @property
    def next_is_boundary(self) -> bool:
        return self.position % self.block_size == 0

    def next_step(self, copies: list[KVCacheBlock]) -> DeviceBeamStep:
        """The group's next step, advancing its position. `copies`: `width` fresh blocks when the step
        is at a block boundary (next_is_boundary), else empty."""
        step_no = self.num_steps + 1
        width = self.width
        if copies:
            self.copies.update(copies)
            if step_no == self.mirrored:  # this step's rows are known already: they take them now
                for table, block in zip(self.tables, copies, strict=True):
                    table.append(block)
            else:
                self.pending[step_no] = copies
        ids = [b.block_id for b in self.tail_blocks]
        parity = self.num_steps % 2
        step = DeviceBeamStep(
            group_id=self.group_id,
            width=width,
            position=self.position,
            tail_blocks=ids[parity * width : (parity + 1) * width],
            full_blocks=[b.block_id for b in copies],
            start=self.start,
        )
        self.start = None
        self.position += 1
        self.num_steps = step_no
        return step

    def advance(self, parents: list[int]) -> list[KVCacheBlock]:
        """Step `mirrored`'s ranking, replayed on the host: row i of the next step continues row
        parents[i]. Returns the boundary copies no row holds any more (to free)."""
        self.tables = [list(self.tables[p]) for p in parents]
        self.mirrored += 1
        copies = self.pending.pop(self.mirrored, None)
        if copies is not None:
            for table, block in zip(self.tables, copies, strict=True):
                table.append(block)
        held = {b for table in self.tables for b in table}
        for later in self.pending.values():
            held.update(later)
        dropped = [b for b in self.copies if b not in held]
        self.copies.intersection_update(held)
        return dropped


def new_device_group(
    group_id: str,
    leader: Request,
    slots: list[Request],
    tail_blocks: list[KVCacheBlock],
    block_size: int,
    start: DeviceBeamStart,
    max_tokens: int,
) -> DeviceBeamGroup:
    """A group whose first step the host ranked (`start`), with its rows' `2 * width` tail blocks."""
    width = len(start.token_ids)
    prompt_len = leader.num_prompt_tokens
    return DeviceBeamGroup(
        group_id=group_id,
        leader=leader,
        slots=slots,
        width=width,
        block_size=block_size,
        tail_blocks=tail_blocks,
        position=prompt_len,
        last_position=prompt_len + max_tokens - 2,
        start=start,
    )
