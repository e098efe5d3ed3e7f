"""Continuous-batching scheduler: who computes how many tokens this step. Plain Python, no torch.

Scheduling is in tokens (see engine/request.py): each step hands out a budget of
`max_num_batched_tokens`. Running requests are served first — decodes, so streams keep flowing, then
ongoing chunked prefills — and the rest of the budget admits waiting requests in queue order, their
prompts chunked to what is left. A waiting request is admitted only while the free blocks after it
cover the running requests' unscheduled prompt chunks and next `admission_reserve_tokens` outputs
(SchedulerConfig; 0: none, vLLM's policy), so they rarely have to preempt one another. When the KV
cache runs out anyway, the running request that arrived last (lowest priority first) is preempted:
its blocks are freed and it is recomputed later from its tokens, ahead of anything that arrived after it.

No deadlock: the input processor rejects any request that could not fit in the whole cache on its
own, and a request that cannot grow even after every other one was preempted preempts itself and
waits until it can run alone.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable

from engine.config import CacheConfig, SchedulerConfig
from engine.core.beam_scheduling import BeamScheduling
from engine.core.fair_queue import FairQueue
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import Request, RequestStatus
from engine.core.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)

# _fork_source's answer when a sibling is still computing the prompt the waiting request would share.
_WAIT_FOR_SIBLING = object()


class Scheduler(BeamScheduling):
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, max_loras: int = 0) -> None:
        """`cache.num_kv_blocks` must be set (the KV cache is sized before anything is scheduled).
        `max_loras`: the most distinct LoRA adapters among running requests (0: no bound)."""
        if cache.num_kv_blocks is None:
            raise ValueError("the scheduler needs the KV cache's size: ResolvedConfig.with_num_kv_blocks")
        self.max_num_seqs = config.max_num_seqs
        self.block_size = cache.block_size
        self.num_kv_blocks = cache.num_kv_blocks
        self.max_model_len = config.max_model_len
        self.max_num_batched_tokens = config.max_num_batched_tokens
        # One request's prompt chunk per step (0: the whole budget): long prompts then take several
        # steps, and the decodes sharing those steps wait for smaller ones.
        self.long_prefill_token_threshold = config.long_prefill_token_threshold
        # With decodes in the step, a prompt's chunk stops where the step would outgrow the largest
        # mixed CUDA graph (0: no such cut): a step past it runs eagerly, ~18 ms of launches for an 8B.
        self.mixed_step_token_cap = config.mixed_step_token_cap
        # Admission keeps free blocks for the running requests' next tokens (SchedulerConfig's
        # admission_reserve_tokens; 0: none). _reserve: the blocks they still need while a step is
        # built, an upper bound until _reserve_exact.
        self.admission_reserve_tokens = config.admission_reserve_tokens
        self._reserve = 0
        self._reserve_exact = False
        self._fit_backlog_limit = max(config.max_num_batched_tokens, config.mixed_step_fit_backlog_tokens)
        self._step_decode_tokens = 0  # decodes scheduled so far in the step being built
        self._step_fit = 0  # the step being built: mixed_step_token_cap, or 0 when it does not apply
        self.kv_cache_manager = KVCacheManager(
            cache.num_kv_blocks, cache.block_size, cache.enable_prefix_caching, cache.sliding_window
        )

        # Every unfinished request, waiting or running.
        self.requests: dict[str, Request] = {}
        # Waiting queue: a heap of (priority, arrival_seq, request). Aborted entries stay in the heap
        # and are skipped when they surface; `_waiting` is the truth.
        self._waiting_heap: list[tuple[int, int, Request]] = []
        self._waiting: dict[str, Request] = {}
        self._num_waiting_tokens = 0
        self._arrival_seq: dict[str, int] = {}
        self._next_seq = 0
        # scheduling_policy "fair": the waiting queue orders tenants (adapters) by the service they
        # have received (engine/core/fair_queue.py) instead of the heap above.
        self._fair = (
            FairQueue(*config.fair_token_weights, base_share=config.fair_base_share)
            if config.scheduling_policy == "fair"
            else None
        )
        # Running requests in admission order (dict: O(1) removal, ordered iteration).
        self.running: dict[str, Request] = {}
        # Finished or aborted since the last schedule(); the runner drops their state.
        self._finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        # step_id -> the Request of every id that step scheduled, until its results are applied (or
        # it failed). At most two entries under async scheduling: the step in flight and the next.
        self._scheduled_steps: dict[int, dict[str, Request]] = {}
        # Beam search (engine/beam_search.py moves beams between steps): beams whose runner state must
        # be sent whole (forked from another beam), and tokens appended to the others since.
        self._beam_resend: set[str] = set()
        self._beam_new_tokens: dict[str, list[int]] = {}
        # A re-sent beam's parent and its length at the fork (the runner may copy the parent's row).
        self._beam_parent: dict[str, tuple[Request, int]] = {}
        self._next_step_id = 1
        # Beam groups ranked on the device (engine/core/beam_device.py, BeamScheduling's methods).
        self.beam_device_ranking = config.beam_device_ranking
        self._device_groups = {}
        self._device_seats = 0
        self._finished_beam_groups = []
        self._next_group_serial = 0
        self.on_device_group_restart = None
        # A step holds only running requests, so keeping their distinct LoRA adapters <= max_loras
        # keeps every step within the runner's adapter slots.
        self.max_loras = max_loras

    # ---------------------------------------------------------------- admission
    def add_request(self, request: Request) -> None:
        """Enqueue a request. It was validated by the input processor (fits the context and the whole
        KV cache, max_tokens resolved); the scheduler never changes its parameters."""
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.req_id] = request
        self._arrival_seq[request.req_id] = self._next_seq
        self._next_seq += 1
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        seq = self._arrival_seq[request.req_id]
        if self._fair is not None:
            self._fair.push(request, seq)
        else:
            heapq.heappush(self._waiting_heap, (request.priority, seq, request))
        self._waiting[request.req_id] = request
        self._num_waiting_tokens += request.num_prompt_tokens

    def _peek_waiting(self) -> Request | None:
        if self._fair is not None:
            return self._fair.peek()
        heap = self._waiting_heap
        while heap:
            req = heap[0][2]
            if self._waiting.get(req.req_id) is req:
                return req
            heapq.heappop(heap)  # aborted while waiting
        return None

    def _pop_waiting(self, request: Request) -> None:
        if self._fair is not None:
            self._fair.pop(request)
        else:
            heapq.heappop(self._waiting_heap)
        del self._waiting[request.req_id]
        self._num_waiting_tokens -= request.num_prompt_tokens

    def _remove_waiting(self, request: Request) -> None:
        del self._waiting[request.req_id]
        self._num_waiting_tokens -= request.num_prompt_tokens
        if self._fair is not None:
            self._fair.remove(request)
            return
        # Lazy deletion; rebuild when stale entries dominate so aborts can't grow the heap forever.
        if len(self._waiting_heap) > 2 * len(self._waiting) + 64:
            self._waiting_heap = [e for e in self._waiting_heap if self._waiting.get(e[2].req_id) is e[2]]
            heapq.heapify(self._waiting_heap)

    # ---------------------------------------------------------------- scheduling
    def _preempt(self, request: Request) -> None:
        del self.running[request.req_id]
        if request.is_beam:
            self._forget_beam_diffs(request)  # the runner drops its state; it comes back whole
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)  # keeps its arrival seq: ahead of everything that came after it

    def _chunk(self, budget: int) -> int:
        """The most tokens one request may compute in this step, given the budget left."""
        cap = self.long_prefill_token_threshold
        chunk = min(budget, cap) if cap > 0 else budget
        fit = self._step_fit
        if fit and 0 < self._step_decode_tokens < fit:
            # Decodes share the step and fit a mixed graph: the step's tokens stay within it (0 when
            # full: the prompt waits). Decodes past the graph make the step eager anyway: no cut.
            scheduled = self.max_num_batched_tokens - budget  # decodes come first
            chunk = min(chunk, max(fit - scheduled, 0))
        return chunk

    def _pick_victim(self) -> Request | None:
        """The running request to preempt: the lowest priority, latest arrival. Never a device-ranked
        beam group's leader (preempting one restarts its whole search: _take_copies does that only
        when nothing else is left); None when only those run."""
        seq = self._arrival_seq
        groups = self._device_groups
        return max(
            (r for r in self.running.values() if r.req_id not in groups),
            key=lambda r: (r.priority, seq[r.req_id]),
            default=None,
        )

    def _reserve_target(self, req: Request) -> int:
        """The tokens admission's reserve counts on the request's table holding: its whole prompt and
        its next admission_reserve_tokens outputs (fewer where max_tokens, resolved by the input
        processor, or max_model_len ends it)."""
        num_prompt = req.num_prompt_tokens
        outputs = len(req.all_token_ids) - num_prompt + req.num_output_placeholders
        grown = min(outputs + self.admission_reserve_tokens, req.sampling_params.max_tokens)  # type: ignore[type-var]
        return min(num_prompt + grown, self.max_model_len)

    def _admission_fits(self, need: int) -> bool:
        """Whether a request whose table would take `need` more blocks may be admitted: the pool keeps
        the running requests' reserve after it. Alone, any request is admitted (the input processor
        checked that it fits the cache). The reserve is an upper bound until that fails; then exact."""
        if not self.running:
            return True
        free = self.kv_cache_manager.num_free_blocks
        if free >= self._reserve + need:
            return True
        if self._reserve_exact:
            return False
        self._reserve = self._running_reserve()
        self._reserve_exact = True
        return free >= self._reserve + need

    def _running_reserve(self) -> int:
        """The blocks the running requests still take to reach their _reserve_target (exact). Without a
        window, _reserve_target's and blocks_to_hold's arithmetic inlined: it runs over every running
        request in steps where admission is tight (300 requests: ~0.2-0.3 ms inlined against ~0.45-0.7 ms
        through the two calls, on a 2-core CPU)."""
        kv = self.kv_cache_manager
        if kv.sliding_window is not None:
            return sum(kv.blocks_to_hold(r.req_id, self._reserve_target(r)) for r in self.running.values())
        bs, extra, cap = self.block_size, self.admission_reserve_tokens, self.max_model_len
        tables = kv.req_to_blocks
        total = 0
        for req_id, r in self.running.items():
            num_prompt = len(r.prompt_token_ids)
            outputs = len(r.all_token_ids) - num_prompt + r.num_output_placeholders
            grown = min(outputs + extra, r.sampling_params.max_tokens)  # type: ignore[type-var]
            need = -(-min(num_prompt + grown, cap) // bs) - len(tables.get(req_id, ()))
            if need > 0:
                total += need
        return total

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        kv = self.kv_cache_manager
        num_scheduled: dict[str, int] = {}
        # req_id -> (request, new block ids) for running requests scheduled this step.
        scheduled_running: dict[str, tuple[Request, list[int]]] = {}
        preempted: list[Request] = []
        beam_steps: list = []
        if self._device_groups:
            beam_steps, budget, preempted = self._device_beam_steps(budget)

        # 1. Running requests: decodes first, then ongoing (chunked) prefills; admission order within.
        # Placeholders count as known: under async scheduling a request whose token is still being
        # sampled by the step in flight is scheduled for it now (the runner feeds it on the device).
        decodes = []
        prefills = []
        prefill_backlog = 0  # prompt tokens not computed yet, running and waiting
        for r in self.running.values():
            # r.num_tokens_with_placeholders, inlined (these loops run for every running request)
            remaining = len(r.all_token_ids) + r.num_output_placeholders - r.num_computed_tokens
            if remaining == 1:
                decodes.append(r)
            elif remaining > 1:
                prefills.append(r)
                prefill_backlog += remaining
        running_backlog = prefill_backlog
        prefill_backlog += self._num_waiting_tokens
        # Cut prompts to the mixed graph only while their backlog is short (SchedulerConfig's
        # mixed_step_fit_backlog_tokens, at least one full step): at light load that keeps the decodes'
        # steps short (ITL); past it the queue's own wait dominates TTFT and full steps drain it (and
        # keep throughput at saturation).
        self._step_fit = self.mixed_step_token_cap if prefill_backlog <= self._fit_backlog_limit else 0
        self._step_decode_tokens = 0
        running = RequestStatus.RUNNING
        max_model_len = self.max_model_len
        # Decodes come first, one token each, so _chunk never cuts one to 0 tokens while the budget lasts
        # (its mixed-graph cut leaves fit - decodes so far >= 1), unless beam steps took part of the budget
        # before them: then it is asked, as for any prompt chunk.
        decode_fits = not beam_steps
        for req in decodes + prefills:
            if budget <= 0:
                break
            if req.status != running:
                continue  # preempted earlier in this loop
            placeholders = req.num_output_placeholders
            if placeholders and (
                req.is_beam
                # the tokens in flight bring it to max_tokens (resolved by the input processor) or max_model_len
                or len(req.output_token_ids) + placeholders >= req.sampling_params.max_tokens  # type: ignore[operator]
                or len(req.all_token_ids) + placeholders >= max_model_len
            ):
                # The step in flight samples its last token: the update finishes it, or, for a beam,
                # the group's next tokens depend on that step's results.
                continue
            remaining = len(req.all_token_ids) + placeholders - req.num_computed_tokens
            num_new = 1 if remaining == 1 and decode_fits else min(remaining, self._chunk(budget))
            if num_new <= 0:
                continue  # an ongoing prefill, and the step is full to its mixed graph
            while True:
                new_block_ids = kv.allocate_slots(req, num_new)
                if new_block_ids is not None:
                    break
                victim = self._pick_victim()
                assert victim is not None  # req itself is running and not a device-ranked group
                if victim.req_id in scheduled_running:
                    # Already given tokens this step: take them back.
                    del scheduled_running[victim.req_id]
                    budget += num_scheduled.pop(victim.req_id)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if new_block_ids is None:
                continue
            scheduled_running[req.req_id] = (req, new_block_ids)
            num_scheduled[req.req_id] = num_new
            budget -= num_new
            if remaining == 1:
                self._step_decode_tokens += 1

        # 2. Waiting requests, in queue order, unless this step already had to preempt.
        new_reqs: list[Request] = []
        no_lora_slot: list[Request] = []
        running_loras = (
            {r.lora_request.lora_int_id for r in self.running.values() if r.lora_request is not None}
            if self.max_loras
            else set()
        )
        running_preempted = bool(preempted)
        seats = self.max_num_seqs - self._device_seats  # a device-ranked group's beams beyond its leader
        reserve_tokens = self.admission_reserve_tokens
        if reserve_tokens:
            # At most each running request's unscheduled prompt and reserve_tokens more, each rounded up.
            bs = self.block_size
            self._reserve = len(self.running) * (-(-reserve_tokens // bs) + 2) + -(-running_backlog // bs)
            self._reserve_exact = False
        while not running_preempted and budget > 0 and len(self.running) < seats:
            if self._chunk(budget) <= 0:
                break  # the step is as large as its mixed graph (fit_mixed_steps_to_cuda_graphs)
            req = self._peek_waiting()
            if req is None:
                break
            if req.is_beam and len(self.running) + self._num_beams_not_running(req) > seats:
                break  # a beam group runs all its beams together: seats for all of them
            if req.num_output_placeholders:
                break  # preempted while its last step was in flight: wait until that token lands
            lora = req.lora_request
            if (
                lora is not None
                and self.max_loras
                and lora.lora_int_id not in running_loras
                and len(running_loras) >= self.max_loras
            ):
                # Every adapter slot is taken by running requests: this one waits (in its place in
                # the queue) and the requests behind it go on.
                self._remove_waiting(req)
                no_lora_slot.append(req)
                continue
            source = self._fork_source(req, num_scheduled) if req.group is not None else None
            if source is _WAIT_FOR_SIBLING:
                break  # a sibling is computing the shared prompt: fork it once it is done
            # Admission's reserve, except for a beam: its running siblings wait for it, so they would
            # never make the room the reserve asks for (a beam preempts later arrivals instead, below).
            reserve_check = reserve_tokens and not req.is_beam
            need = 0  # blocks the request's table will take in all (the reserve's count)
            free_before = kv.num_free_blocks
            if source is not None:
                if reserve_check:
                    # A fork shares its prompt's blocks: its own hold its outputs (and a copied last block).
                    need = -(-(self._reserve_target(req) - req.num_prompt_tokens) // self.block_size) + 1
                    if not self._admission_fits(need):
                        break
                num_hit_tokens = self._fork(req, source, self._chunk(budget))
                allocated = num_hit_tokens is not None
            else:
                computed_blocks, num_hit_tokens = kv.get_computed_blocks(req)
                if reserve_check:
                    need = kv.blocks_to_hold(req.req_id, self._reserve_target(req), computed_blocks)
                    if not self._admission_fits(need):
                        break  # no skipping ahead: the running requests finish and make room
                allocated = kv.allocate_slots(
                    req, min(req.num_tokens - num_hit_tokens, self._chunk(budget)), computed_blocks
                )
                allocated = allocated is not None
            if not allocated:
                # No skipping ahead: the head of the queue would starve. A beam's siblings may be
                # holding blocks while they wait for it: later arrivals make room (no deadlock).
                victim = self._pick_victim() if req.is_beam and self.running else None
                if (
                    victim is None
                    or victim.req_id in num_scheduled
                    and victim.req_id not in scheduled_running
                ):
                    break
                if (victim.priority, self._arrival_seq[victim.req_id]) < (
                    req.priority,
                    self._arrival_seq[req.req_id],
                ):
                    break
                if victim.req_id in scheduled_running:
                    del scheduled_running[victim.req_id]
                    budget += num_scheduled.pop(victim.req_id)
                self._preempt(victim)
                preempted.append(victim)
                continue
            assert num_hit_tokens is not None
            if reserve_check:  # what it will still take, beyond the blocks it took now
                self._reserve += max(0, need - (free_before - kv.num_free_blocks))
            num_new = min(req.num_tokens - num_hit_tokens, self._chunk(budget))
            self._pop_waiting(req)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_hit_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit_tokens
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running[req.req_id] = req
            if lora is not None:
                running_loras.add(lora.lora_int_id)
            new_reqs.append(req)
            num_scheduled[req.req_id] = num_new
            budget -= num_new
        if no_lora_slot:
            # Back in their places (their arrival seqs); under the fair policy without the lift a
            # tenant gets when it starts waiting: these never stopped.
            counters = dict(self._fair.counters) if self._fair is not None else None
            for req in no_lora_slot:
                self._enqueue(req)
            if counters is not None:
                self._fair.counters.update(counters)

        # 3. Build the runner's diff and advance num_computed_tokens now (the runner computes them).
        # A request whose chunk reaches the end of its tokens gets one sampled token this step: a
        # placeholder until the update brings its id.
        cached_data = []
        scheduled_requests: dict[str, Request] = {}
        num_prompt_scheduled = 0
        replaced = kv.replaced
        beam_diffs = bool(self._beam_resend or self._beam_new_tokens)
        forked_data = []
        for req, new_block_ids in scheduled_running.values():
            if beam_diffs and req.req_id in self._beam_resend:
                # Forked from another beam: the runner copies the parent's row, or gets it whole.
                self._beam_resend.discard(req.req_id)
                fork = self._fork_data(req, preempted)
                if fork is None:
                    new_reqs.append(req)
                    continue
                forked_data.append(fork)
                self._beam_new_tokens.pop(req.req_id, None)
                num_prompt_scheduled += self._advance(req, num_scheduled[req.req_id])
                scheduled_requests[req.req_id] = req
                continue
            cached_data.append(
                CachedRequestData(
                    req.req_id,
                    new_block_ids,
                    req.num_computed_tokens,
                    self._beam_new_tokens.pop(req.req_id, []) if beam_diffs else [],
                    replaced.get(req.req_id) if replaced else None,
                )
            )
            # _advance(req, num_scheduled[req_id]), inlined: this loop runs for every running request
            start = req.num_computed_tokens
            end = req.num_computed_tokens = start + num_scheduled[req.req_id]
            if end == len(req.all_token_ids) + req.num_output_placeholders:
                req.num_output_placeholders += 1
            num_prompt = len(req.prompt_token_ids)
            if start < num_prompt:
                num_prompt_scheduled += min(end, num_prompt) - start
            scheduled_requests[req.req_id] = req
        new_data = []
        for req in new_reqs:
            new_data.append(
                NewRequestData(
                    req_id=req.req_id,
                    token_ids=list(req.all_token_ids),
                    num_prompt_tokens=req.num_prompt_tokens,
                    sampling_params=req.sampling_params,
                    block_ids=kv.get_block_ids(req.req_id),
                    num_computed_tokens=req.num_computed_tokens,
                    is_beam=req.is_beam,
                    lora_request=req.lora_request,
                )
            )
            if req.is_beam:
                self._beam_new_tokens.pop(req.req_id, None)
            num_prompt_scheduled += self._advance(req, num_scheduled[req.req_id])
            scheduled_requests[req.req_id] = req

        if self._fair is not None:
            self._fair.charge(scheduled_requests.values(), num_scheduled)
        finished, self._finished_req_ids = self._finished_req_ids, set()
        finished_groups: list[str] = []
        if num_scheduled or beam_steps:  # an empty step never reaches the runner: they wait for one
            finished_groups, self._finished_beam_groups = self._finished_beam_groups, []
        step_id = self._next_step_id
        self._next_step_id += 1
        if scheduled_requests:
            self._scheduled_steps[step_id] = scheduled_requests
        return SchedulerOutput(
            new_requests=new_data,
            cached_requests=cached_data,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()) + sum(s.width for s in beam_steps),
            finished_req_ids=finished,
            preempted_req_ids={r.req_id for r in preempted},
            step_id=step_id,
            num_prompt_tokens=num_prompt_scheduled,
            forked_requests=forked_data,
            block_copies=kv.take_copies(),
            beam_steps=beam_steps,
            finished_beam_groups=finished_groups,
        )

    def _fork_source(self, req: Request, num_scheduled: dict[str, int]) -> Request | object | None:
        """A running sibling whose KV holds the shared prompt (all but its last token, which each
        sequence computes for its own first token) as of the steps before this one, so any copy of it
        runs after that KV was written; _WAIT_FOR_SIBLING while one is still computing the prompt;
        None when none runs, or when a sliding window has moved each running one past the prompt and
        released blocks a fork would read (this one then computes the prompt itself, from the prefix
        cache where it can)."""
        fork_at = req.num_prompt_tokens - 1
        if fork_at <= 0 or req.sampling_params.prompt_logprobs is not None:
            return None  # nothing to share, or every prompt position must be scored
        waiting = False
        for sibling in req.group or ():
            if sibling is req or sibling.status != RequestStatus.RUNNING:
                continue
            if sibling.num_computed_tokens - num_scheduled.get(sibling.req_id, 0) >= fork_at:
                if self.kv_cache_manager.can_fork(sibling, fork_at):
                    return sibling
                continue
            waiting = True
        return _WAIT_FOR_SIBLING if waiting else None

    def _fork(self, req: Request, source: Request, budget: int) -> int | None:
        """Share `source`'s prompt blocks with `req` and allocate the rest of its chunk; returns the
        tokens it starts with computed, or None (nothing changed) when the pool is short."""
        kv = self.kv_cache_manager
        fork_at = req.num_prompt_tokens - 1
        kv.fork(req, source, fork_at)
        req.num_computed_tokens = fork_at
        if kv.allocate_slots(req, min(req.num_tokens - fork_at, budget)) is None:
            kv.free(req)
            req.num_computed_tokens = 0
            return None
        return fork_at

    @staticmethod
    def _advance(req: Request, num_new: int) -> int:
        """Advance num_computed_tokens by a scheduled chunk; returns how many of its tokens are prompt."""
        start = req.num_computed_tokens
        end = req.num_computed_tokens = start + num_new
        if end == len(req.all_token_ids) + req.num_output_placeholders:  # num_tokens_with_placeholders
            req.num_output_placeholders += 1
        num_prompt = len(req.prompt_token_ids)
        if start >= num_prompt:
            return 0  # a decode
        return min(end, num_prompt) - start

    # ---------------------------------------------------------------- results
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[tuple[Request, list[int]]]:
        """Append sampled tokens, apply stop conditions, free finished requests.

        Returns (request, tokens appended this step) for every request that got tokens, finished or not.
        """
        # Runs for every running request every step: locals for the lookups, no property calls.
        out: list[tuple[Request, list[int]]] = []
        append = out.append
        sampled = runner_output.sampled_token_ids
        requests = self.requests
        check_stop = self._check_stop
        finished = RequestStatus.FINISHED_STOPPED  # the first finished status
        for req_id, req in self._scheduled_steps.pop(scheduler_output.step_id, {}).items():
            token_ids = sampled.get(req_id)
            if not token_ids:
                continue  # a prefill chunk that did not reach the end
            num_new = len(token_ids)
            placeholders = req.num_output_placeholders - num_new
            req.num_output_placeholders = placeholders if placeholders > 0 else 0
            if requests.get(req_id) is not req or req.status >= finished:
                # Finished or aborted since it was scheduled (with async scheduling, also by a stop
                # found in the previous step's output, after this step was launched): drop the token.
                continue
            if req.is_beam:
                append((req, []))  # the engine's beam search picks its tokens from the logprobs
                continue
            # RUNNING, or PREEMPTED by a schedule() made while this step was in flight: a preempted
            # request keeps its token, which becomes part of what it recomputes.
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            output_ids, all_ids = req.output_token_ids, req.all_token_ids
            for i, tok in enumerate(token_ids):
                output_ids.append(tok)  # Request.append_output_token, inlined
                all_ids.append(tok)
                status = check_stop(req, tok)
                if status is not None:
                    self._finish(req, status)
                    num_new = i + 1  # tokens after the stop are dropped
                    break
            append((req, token_ids[:num_new]))
        return out

    def scheduled_requests(self, scheduler_output: SchedulerOutput) -> dict[str, Request]:
        """req_id -> the Request a step was scheduled for, until its results are applied."""
        return self._scheduled_steps.get(scheduler_output.step_id, {})

    def drop_step(self, scheduler_output: SchedulerOutput) -> None:
        """Forget a step whose results will never come (its forward pass failed)."""
        self._scheduled_steps.pop(scheduler_output.step_id, None)

    def _check_stop(self, req: Request, token_id: int) -> RequestStatus | None:
        sp = req.sampling_params
        num_output_tokens = len(req.output_token_ids)
        if token_id in sp.all_stop_token_ids and num_output_tokens > sp.min_tokens:
            # stop_reason names the user's stop token; EOS reports None, as in vLLM.
            req.stop_reason = token_id if token_id in (sp.stop_token_ids or ()) else None
            return RequestStatus.FINISHED_STOPPED
        assert sp.max_tokens is not None  # resolved by the input processor
        if num_output_tokens >= sp.max_tokens or len(req.all_token_ids) >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.req_id in self.running:
            del self.running[req.req_id]
        elif req.req_id in self._waiting:
            self._remove_waiting(req)
        req.status = status
        req.group = None  # its siblings skip it now; no reference cycle outlives the group
        if req.is_beam:
            self._forget_beam_diffs(req)
            if self._device_groups:
                self._release_device_group(req)
        # A failed forward pass left garbage in blocks already registered for prefix hits.
        self.kv_cache_manager.free(req, uncache=status == RequestStatus.FINISHED_ERROR)
        del self.requests[req.req_id]
        del self._arrival_seq[req.req_id]
        self._finished_req_ids.add(req.req_id)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Abort, or stop on a stop string: frees blocks. Unknown or already-finished ids are ignored."""
        if not status.finished:
            raise ValueError(f"finish_requests needs a finished status; got {status.name}")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        for req_id in req_ids:
            req = self.requests.get(req_id)
            if req is not None:
                self._finish(req, status)

    # ---------------------------------------------------------------- introspection
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, req_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(req_id)

    @property
    def num_running(self) -> int:
        """Running sequences, every beam of a device-ranked group included."""
        return len(self.running) + self._device_seats

    def running_context_lengths(self) -> list[int]:
        """The tokens each running sequence has in the KV cache (a device-ranked group's beams: the
        position of its next step, the same for all of them)."""
        groups = self._device_groups
        lengths = []
        for r in self.running.values():
            group = groups.get(r.req_id) if groups else None
            if group is None:
                lengths.append(r.num_computed_tokens)
            else:
                lengths += [group.position] * group.width
        return lengths

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_waiting_tokens(self) -> int:
        """Prompt tokens of the waiting (and preempted) requests: what admission control bounds."""
        return self._num_waiting_tokens

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_manager.usage

    @property
    def prefix_cache_queries(self) -> int:
        return self.kv_cache_manager.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.kv_cache_manager.prefix_cache_hits

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()
