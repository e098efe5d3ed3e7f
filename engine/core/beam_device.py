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
  reads a block that another row's copy of the same step writes;
- at a block boundary the parent's last tail is full: each row copies it into a fresh block, which
  becomes a full block of its table (full blocks are then shared by reference: the device gathers
  the rows' tables from their parents');
- so a group reserves, when it starts, every block it can need: two tails and one block per boundary
  up to max_tokens for each beam (the prompt's blocks stay the leader's). It never allocates again,
  so it is never preempted; a group that cannot reserve them runs the host's way.

Not on the device: stop strings (the text is the host's), LoRA adapters, tensor parallelism; such
groups rank on the host (engine/core/beam_scheduling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    reserve: list[KVCacheBlock]  # every block the group's steps write, held until it ends
    tails: tuple[list[int], list[int]]  # [2][width] the rows' tail blocks, used in turn
    spare: list[int]  # the full-block copies of the boundaries to come, `width` per boundary, in order
    position: int  # the position the group's next step computes
    last_position: int  # the last position a step may compute (its token's successor is max_tokens')
    start: DeviceBeamStart | None  # sent with the first step
    num_steps: int = 0

    @property
    def has_step_left(self) -> bool:
        return self.position <= self.last_position

    def next_step(self) -> DeviceBeamStep:
        """The group's next step, advancing its position."""
        pos = self.position
        width = self.width
        full: list[int] = []
        if pos % self.block_size == 0:
            full, self.spare = self.spare[:width], self.spare[width:]
        step = DeviceBeamStep(
            group_id=self.group_id,
            width=width,
            position=pos,
            tail_blocks=self.tails[self.num_steps % 2],
            full_blocks=full,
            start=self.start,
        )
        self.start = None
        self.position = pos + 1
        self.num_steps += 1
        return step


def blocks_to_reserve(width: int, prompt_len: int, max_tokens: int, block_size: int) -> int:
    """Blocks a group's device steps need: two tails per beam, and a copy per beam at every block
    boundary among the positions they compute (prompt_len .. prompt_len + max_tokens - 2: the first
    token was ranked by the host, each step feeds one and ranks the next)."""
    last = prompt_len + max_tokens - 2
    boundaries = last // block_size - (prompt_len - 1) // block_size
    return width * (2 + boundaries)


def new_device_group(
    group_id: str,
    leader: Request,
    slots: list[Request],
    reserve: list[KVCacheBlock],
    prompt_block_ids: list[int],
    block_size: int,
    start: DeviceBeamStart,
    max_tokens: int,
) -> DeviceBeamGroup:
    """A group whose first step the host ranked (`start`), its blocks reserved (`reserve`, as many as
    blocks_to_reserve says) and the leader's prompt blocks `prompt_block_ids`."""
    width = len(start.token_ids)
    ids = [b.block_id for b in reserve]
    prompt_len = leader.num_prompt_tokens
    return DeviceBeamGroup(
        group_id=group_id,
        leader=leader,
        slots=slots,
        width=width,
        block_size=block_size,
        reserve=reserve,
        tails=(ids[:width], ids[width : 2 * width]),
        spare=ids[2 * width :],
        position=prompt_len,
        last_position=prompt_len + max_tokens - 2,
        start=start,
    )
