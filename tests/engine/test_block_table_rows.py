"""The runner's block tables as persistent rows (engine/worker/block_table_rows.py): a step's gathered
table equals the one built from the requests' block lists entry for entry, through added blocks,
copy-on-write replacements, requests leaving and rows reused, more requests than rows and tables wider
than the rows."""

from __future__ import annotations

import random

import numpy as np

from engine.core.sampling_params import SamplingParams
from engine.worker.block_table_rows import BlockTableRows
from engine.worker.input_batch import RequestState, block_table_array


def _state(req_id: str, blocks: list[int]) -> RequestState:
    return RequestState(
        req_id=req_id,
        token_ids=[],
        prompt_token_ids=[],
        output_token_ids=[],
        sampling_params=SamplingParams(),
        block_ids=list(blocks),
        num_computed_tokens=0,
        emit_prompt_logprobs=False,
    )


def test_gathered_rows_equal_the_lists_through_a_random_run() -> None:
    rng = random.Random(0)
    rows = BlockTableRows(width=4, capacity=2)  # both outgrown below
    live: dict[str, RequestState] = {}
    for step in range(300):
        op = rng.random()
        if op < 0.2 or not live:
            live[f"r{step}"] = _state(f"r{step}", [rng.randrange(1, 500) for _ in range(rng.randint(1, 6))])
        elif op < 0.3:
            rows.release(live.pop(rng.choice(sorted(live))))
        elif op < 0.4:
            state = live[rng.choice(sorted(live))]
            index = rng.randrange(len(state.block_ids))
            state.block_ids[index] = rng.randrange(500, 1000)  # copy-on-write, as update_states applies it
            state.table_len = min(state.table_len, index)
        else:
            for state in live.values():
                if rng.random() < 0.3:
                    state.block_ids.extend(rng.randrange(1, 500) for _ in range(rng.randint(1, 3)))
        scheduled = [live[k] for k in sorted(live) if rng.random() < 0.8]
        table_rows = [rows.sync(s) for s in scheduled]
        width = max((len(s.block_ids) for s in scheduled), default=0)
        num_rows = len(scheduled) + rng.randint(0, 3)  # a CUDA graph's padding rows
        got = rows.gather(table_rows, num_rows, width)
        want = block_table_array([s.block_ids for s in scheduled], num_rows)
        assert got.dtype == want.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    assert len(rows) == len({s.table_row for s in live.values() if s.table_row >= 0})
    assert rows.table.shape[0] > 2 and rows.table.shape[1] > 4  # grew in both directions


def test_a_released_row_is_zeroed_and_reused() -> None:
    rows = BlockTableRows(width=8, capacity=4)
    a, b = _state("a", [5, 6, 7]), _state("b", [9])
    assert (rows.sync(a), rows.sync(b)) == (0, 1) and len(rows) == 2
    rows.release(a)
    assert (a.table_row, a.table_len, len(rows)) == (-1, 0, 1)
    assert not rows.table[0].any()
    c = _state("c", [3])
    assert rows.sync(c) == 0  # the freed row, holding nothing past c's one block
    np.testing.assert_array_equal(rows.gather([0, 1], 3, 1), [[3], [9], [0]])
    rows.release(a)  # a second release of a request without a row does nothing
    assert len(rows) == 2


def test_gather_scheduled_brings_rows_up_to_date_and_update_states_gives_them_back() -> None:
    """Through the runner's own steps: new requests get rows, added blocks and a copy-on-write reach them
    (gather_scheduled syncs only a row its request's blocks outgrew), and a finished request's row is freed
    and zeroed for the next."""
    from engine.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
    from engine.worker.input_batch import gather_scheduled, update_states

    def output(new=(), cached=(), finished=()) -> SchedulerOutput:
        return SchedulerOutput(
            new_requests=list(new),
            cached_requests=list(cached),
            num_scheduled_tokens={},
            total_num_scheduled_tokens=0,
            finished_req_ids=set(finished),
            preempted_req_ids=set(),
        )

    def new(req_id: str, blocks: list[int]) -> NewRequestData:
        return NewRequestData(
            req_id=req_id,
            token_ids=[1] * (4 * len(blocks) - 1),
            num_prompt_tokens=4 * len(blocks) - 1,
            sampling_params=SamplingParams(),
            block_ids=blocks,
            num_computed_tokens=0,
        )

    rows = BlockTableRows(width=4, capacity=2)
    requests: dict[str, RequestState] = {}
    update_states(requests, output(new=[new("a", [3, 4]), new("b", [5])]), rows)

    def step() -> np.ndarray:
        batch = gather_scheduled(requests, {"a": 1, "b": 1}, None, 4, rows)
        lists = [s.block_ids for s in batch.states]
        got = rows.gather(batch.table_rows, 3, batch.max_num_blocks)
        np.testing.assert_array_equal(got, block_table_array(lists, 3))
        return got

    step()
    a = requests["a"]
    update_states(requests, output(cached=[CachedRequestData("a", [6], 5, [], (1, 9))]), rows)
    assert a.table_len == 1  # the copy-on-write of entry 1: the row copies from there again
    assert step()[0].tolist() == [3, 9, 6]
    update_states(requests, output(finished=["a"]), rows)
    assert a.table_row == -1 and not rows.table[0].any() and len(rows) == 1
    update_states(requests, output(new=[new("c", [7])]), rows)
    batch = gather_scheduled(requests, {"c": 1}, None, 4, rows)
    assert batch.table_rows == [0]  # a's row, zeroed, now c's
    np.testing.assert_array_equal(rows.gather(batch.table_rows, 1, 1), [[7]])
