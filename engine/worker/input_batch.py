"""The runner's per-request state and the host side of a step's flat batch.

`RequestState` is what the runner knows of each running request (its tokens, blocks, how far the KV
cache holds it); `update_states` applies the scheduler's diff to the runner's map of them. The array
builders turn the scheduled sequences into the flat batch's host arrays (input ids, positions, slot
mapping, sequence lengths, query starts, block tables), which the runner then copies to the device.

Hot path, once per step over up to max_num_seqs sequences: the builders are vectorized over tokens
with numpy (per-sequence loops only), and the decode-only builder (every CUDA-graph decode step) is
plain Python over sequences plus a fixed handful of numpy calls, since every call costs microseconds
of host time the GPU waits for. Module functions, not methods: the runner calls each once per step,
so moving them here added no call per request.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.sampling_params import SamplingParams
from engine.core.scheduler_output import ForkedRequestData, NewRequestData, SchedulerOutput
from engine.worker.block_table_rows import BlockTableRows
from engine.worker.cuda_graphs import DecodeArrays, pad_decode_batch

if TYPE_CHECKING:
    from engine.worker.sampler import RowConstants


@dataclass(slots=True, eq=False)
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt + every output known to the runner
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # False when the request came back after preemption with outputs: its prompt logprobs were sent.
    emit_prompt_logprobs: bool
    # Penalties read the output ids themselves, so such a request cannot sample on top of a token
    # still in flight: the runner resolves the previous step first.
    needs_output_ids: bool = False
    # False for a beam of a beam search: the engine picks its next token (sent as new_token_ids).
    appends_sampled: bool = True
    # Its LoRA adapter (engine.lora.adapter.LoRAAdapter), held while the runner holds the request.
    lora: Any = None
    # Its row of the runner's BlockTableRows (-1: none yet) and how many of block_ids that row holds.
    table_row: int = -1
    table_len: int = 0
    # What the sampler's metadata reads of sampling_params (engine.worker.sampler.row_constants), once made.
    sampling_constants: RowConstants | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def new_request_state(new: NewRequestData) -> RequestState:
    token_ids = list(new.token_ids)
    num_prompt = new.num_prompt_tokens
    return RequestState(
        req_id=new.req_id,
        token_ids=token_ids,
        prompt_token_ids=token_ids[:num_prompt],
        output_token_ids=token_ids[num_prompt:],
        sampling_params=new.sampling_params,
        block_ids=list(new.block_ids),
        num_computed_tokens=new.num_computed_tokens,
        emit_prompt_logprobs=new.sampling_params.prompt_logprobs is not None and len(token_ids) == num_prompt,
        appends_sampled=not new.is_beam,
        needs_output_ids=new.sampling_params.repetition_penalty != 1.0
        or new.sampling_params.frequency_penalty != 0.0
        or new.sampling_params.presence_penalty != 0.0,
    )


def forked_request_state(requests: dict[str, RequestState], fork: ForkedRequestData) -> RequestState:
    """A beam forked from a beam this runner holds: the parent's first tokens plus its own, the
    parent's prompt list and parameters (shared, never written) and adapter."""
    parent = requests.get(fork.parent_req_id)
    if parent is None or len(parent.token_ids) < fork.num_parent_tokens:
        raise RuntimeError(
            f"beam {fork.req_id!r} forks {fork.parent_req_id!r} at {fork.num_parent_tokens} tokens, "
            f"which the runner does not hold"
        )
    token_ids = parent.token_ids[: fork.num_parent_tokens] + fork.new_token_ids
    return RequestState(
        req_id=fork.req_id,
        token_ids=token_ids,
        prompt_token_ids=parent.prompt_token_ids,
        output_token_ids=token_ids[len(parent.prompt_token_ids) :],
        sampling_params=parent.sampling_params,
        block_ids=list(fork.block_ids),
        num_computed_tokens=fork.num_computed_tokens,
        emit_prompt_logprobs=False,
        needs_output_ids=parent.needs_output_ids,
        appends_sampled=False,
        lora=parent.lora,
    )


def update_states(requests: dict[str, RequestState], so: SchedulerOutput, rows: BlockTableRows) -> None:
    """Apply the scheduler's diff to the runner's per-request states (in place); a request that leaves
    (or is replaced) gives its block-table row back to `rows`."""
    for req_id in itertools.chain(so.finished_req_ids, so.preempted_req_ids):
        gone = requests.pop(req_id, None)
        if gone is not None:
            rows.release(gone)
    for new in so.new_requests:
        _replace(requests, new.req_id, new_request_state(new), rows)
    for fork in so.forked_requests:
        _replace(requests, fork.req_id, forked_request_state(requests, fork), rows)
    for cached in so.cached_requests:
        state = requests.get(cached.req_id)
        if state is None:
            raise RuntimeError(
                f"scheduler sent a diff for request {cached.req_id!r}, which the runner does not hold"
            )
        if cached.cow is not None:
            index, block_id = cached.cow
            state.block_ids[index] = block_id
            state.table_len = min(state.table_len, index)  # its row copies entry `index` again
        state.block_ids.extend(cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens
        if cached.new_token_ids:
            state.token_ids.extend(cached.new_token_ids)
            state.output_token_ids.extend(cached.new_token_ids)


def _replace(
    requests: dict[str, RequestState], req_id: str, state: RequestState, rows: BlockTableRows
) -> None:
    old = requests.get(req_id)
    if old is not None:
        rows.release(old)
    requests[req_id] = state


def block_table_array(block_tables: list[list[int]], num_rows: int) -> np.ndarray:
    """[num_rows, max(1, longest table)] int32, zero-padded (rows past len(block_tables) too): one flat
    fromiter and one scatter, since a numpy assignment per row costs more."""
    num_seqs = len(block_tables)
    lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=num_seqs)  # [num_seqs]
    total = int(lens.sum())
    tables = np.zeros((num_rows, max(int(lens.max(initial=0)), 1)), dtype=np.int32)
    if total:
        rows = np.repeat(np.arange(num_seqs), lens)
        cols = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        tables[rows, cols] = np.fromiter(
            itertools.chain.from_iterable(block_tables), dtype=np.int32, count=total
        )
    return tables


def flat_batch_arrays(
    token_ids: list[list[int]],  # per sequence: its known tokens
    num_computed: list[int],  # per sequence
    num_scheduled: list[int],  # per sequence
    block_tables: list[list[int]],  # per sequence
    block_size: int,
    tables: np.ndarray | None = None,  # [num_seqs, longest table] of block_tables, if already built
) -> tuple[DecodeArrays, int]:
    """The flat batch of any step (num_scheduled[s] tokens of sequence s from num_computed[s]),
    vectorized over tokens -> (its arrays, the longest query)."""
    num_seqs = len(token_ids)
    n = np.asarray(num_scheduled, dtype=np.int64)  # [num_seqs]
    computed = np.asarray(num_computed, dtype=np.int64)  # [num_seqs]
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(n, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    # A last token not known yet (still being sampled on the device) is a 0 here; the runner
    # scatters the real id in on the device.
    input_ids = np.fromiter(
        itertools.chain.from_iterable(
            t[c : c + k] if c + k <= len(t) else (*t[c:], 0)
            for t, c, k in zip(token_ids, num_computed, num_scheduled, strict=True)
        ),
        dtype=np.int64,
        count=num_tokens,
    )
    # position of flat token t in sequence s: t - query_start_loc[s] + num_computed[s]
    positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(computed - query_start_loc[:-1], n)
    if tables is None:
        tables = block_table_array(block_tables, num_seqs)
    seq_idx = np.repeat(np.arange(num_seqs), n)  # [num_tokens]
    block_idx = positions // block_size
    slot_mapping = tables[seq_idx, block_idx].astype(np.int64) * block_size + positions % block_size
    arrays = DecodeArrays(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        seq_lens=(computed + n).astype(np.int32),
        query_start_loc=query_start_loc.astype(np.int32),
        block_tables=tables,
    )
    return arrays, int(n.max(initial=0))


def decode_batch_arrays(
    token_ids: list[list[int]],
    num_computed: list[int],
    block_tables: list[list[int]],
    block_size: int,
    graph_size: int,
    tables: np.ndarray | None = None,  # [graph_size, longest table] of block_tables, if already built
) -> DecodeArrays:
    """A decode-only step (token num_computed[s] of each sequence) padded to graph_size rows.

    The CUDA-graph hot path: plain Python over sequences and a fixed handful of numpy calls.
    """
    bs = block_size
    return pad_decode_batch(
        [t[c] if c < len(t) else 0 for t, c in zip(token_ids, num_computed, strict=True)],
        num_computed,
        [b[c // bs] * bs + c % bs for b, c in zip(block_tables, num_computed, strict=True)],
        [c + 1 for c in num_computed],
        block_table_array(block_tables, graph_size) if tables is None else tables,
        graph_size,
    )


@dataclass(slots=True, eq=False)
class ScheduledBatch:
    """The scheduled requests of one step, in flat-batch order, and the rows that need logits."""

    states: list[RequestState]
    num_scheduled: list[int]
    sample_rows: list[int]  # flat-batch rows whose logits are sampled
    sample_states: list[RequestState]
    num_pending: list[int]  # per sampled row: 1 if its input token is still in flight
    pending_dst: list[int]  # flat-batch rows whose input id comes from the step in flight on the device
    pending_src: list[int]  # ... and the row of that step's sampled ids it comes from
    prompt_rows: list[np.ndarray]  # flat-batch rows scored for prompt logprobs
    prompt_targets: list[tuple[RequestState, list[int]]]
    num_tokens: int
    max_scheduled: int
    max_num_blocks: int
    table_rows: list[int]  # per sequence: its BlockTableRows row


def gather_scheduled(
    requests: dict[str, RequestState],
    scheduled: dict[str, int],  # req_id -> tokens scheduled this step
    in_flight_rows: dict[str, int] | None,  # req_id -> row of the step in flight's sampled ids
    block_size: int,
    rows: BlockTableRows,
) -> ScheduledBatch:
    """Walk the scheduled requests once (the per-request loop of every step): check each against its
    state, lay it out in the flat batch, note which rows need logits, and bring each one's
    block-table row in `rows` up to date."""
    states: list[RequestState] = []
    num_scheduled: list[int] = []
    sample_rows: list[int] = []
    sample_states: list[RequestState] = []
    num_pending: list[int] = []
    pending_dst: list[int] = []
    pending_src: list[int] = []
    prompt_rows: list[np.ndarray] = []
    prompt_targets: list[tuple[RequestState, list[int]]] = []
    table_rows: list[int] = []
    sync = rows.sync
    offset = 0
    max_scheduled = 0
    max_num_blocks = 0
    for req_id, n in scheduled.items():
        state = requests.get(req_id)
        if state is None:
            raise RuntimeError(f"request {req_id!r} is scheduled but the runner holds no state for it")
        start, end = state.num_computed_tokens, state.num_computed_tokens + n
        known = len(state.token_ids)
        if end > known:
            # Only the last scheduled token may be unknown, and only if the step in flight samples it.
            if end > known + 1 or in_flight_rows is None or req_id not in in_flight_rows:
                raise RuntimeError(
                    f"request {req_id!r}: {n} tokens scheduled from {start}, but only {known} are known"
                )
            pending_dst.append(offset + n - 1)
            pending_src.append(in_flight_rows[req_id])
        if end > len(state.block_ids) * block_size:
            raise RuntimeError(f"request {req_id!r}: {len(state.block_ids)} blocks cannot hold {end} tokens")
        states.append(state)
        # its row, synced only when it has blocks the row lacks (a new block every block_size tokens)
        row = state.table_row
        table_rows.append(row if row >= 0 and state.table_len == len(state.block_ids) else sync(state))
        num_scheduled.append(n)
        max_scheduled = max(max_scheduled, n)
        max_num_blocks = max(max_num_blocks, len(state.block_ids))
        if end >= known:
            sample_rows.append(offset + n - 1)
            sample_states.append(state)
            num_pending.append(end - known)
        if state.emit_prompt_logprobs:
            # position p scores token p + 1; only positions whose next token is a prompt token
            last = min(end, state.num_prompt_tokens - 1)
            if last > start:
                prompt_rows.append(np.arange(offset, offset + last - start))
                prompt_targets.append((state, state.token_ids[start + 1 : last + 1]))
        offset += n
    return ScheduledBatch(
        states=states,
        num_scheduled=num_scheduled,
        sample_rows=sample_rows,
        sample_states=sample_states,
        num_pending=num_pending,
        pending_dst=pending_dst,
        pending_src=pending_src,
        prompt_rows=prompt_rows,
        prompt_targets=prompt_targets,
        num_tokens=offset,
        max_scheduled=max_scheduled,
        max_num_blocks=max_num_blocks,
        table_rows=table_rows,
    )
