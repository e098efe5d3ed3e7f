"""The waiting queue of `scheduling_policy="fair"`: tenants (adapters) served by how little service they
have received, after the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024). Plain Python, no torch.

Why: in arrival order, a tenant that sends ten times the others' load fills the queue, and everyone
else's queueing delay grows with it. Here every tenant has a counter of the weighted tokens the engine
has computed for it (by default prompt tokens at weight 1, output tokens at weight 2, the paper's w_p
and w_q: a decode step costs a token's share of a whole forward pass, a prefill token much less;
EngineConfig.fair_prompt_token_weight / fair_output_token_weight), divided by the tenant's share
(LoRARequest.fair_share; EngineConfig.fair_base_share, default 1, for the base model: a tenant of
share 2 is served about twice as much
while both wait, the paper's weighted variant); the head of
the queue is the oldest request of the waiting tenant with the lowest counter. A tenant that starts
waiting is lifted to the lowest counter among the tenants already waiting (or, if none is, to the
counter of the last tenant admitted), so idling earns no credit to later burst ahead of everyone.

A tenant is an adapter's `lora_int_id`; the base model is tenant 0. Within a tenant the order is the
scheduler's own: priority, then arrival.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

from engine.core.request import Request

PROMPT_TOKEN_WEIGHT = 1.0
OUTPUT_TOKEN_WEIGHT = 2.0


def tenant_of(request: Request) -> int:
    """The tenant a request's service is charged to: its adapter's id, 0 for the base model."""
    return request.lora_int_id


def share_of(request: Request, base_share: float = 1.0) -> float:
    """The tenant's share of the service: its adapter's fair_share, `base_share` for the base model."""
    lora = request.lora_request
    return lora.fair_share if lora is not None else base_share


class FairQueue:
    """Waiting requests, per tenant in (priority, arrival) order, tenants by their virtual counters."""

    def __init__(
        self,
        prompt_token_weight: float = PROMPT_TOKEN_WEIGHT,
        output_token_weight: float = OUTPUT_TOKEN_WEIGHT,
        base_share: float = 1.0,
    ) -> None:
        self.prompt_token_weight = prompt_token_weight
        self.output_token_weight = output_token_weight
        self.base_share = base_share  # the base model's (tenant 0's) share; EngineConfig.fair_base_share
        # tenant -> heap of (priority, arrival seq, request); removed requests stay until they surface.
        self._heaps: dict[int, list[tuple[int, int, Request]]] = {}
        self._live: dict[str, Request] = {}  # req_id -> request: the truth of who is waiting
        self._num_live: dict[int, int] = {}  # tenant -> its live waiting requests
        self.counters: dict[int, float] = {}
        self._last_admitted_counter = 0.0

    def __len__(self) -> int:
        return len(self._live)

    def push(self, request: Request, seq: int) -> None:
        tenant = tenant_of(request)
        if not self._num_live.get(tenant):
            # Starts waiting: no credit for the time it was idle.
            waiting = [self.counters[t] for t, n in self._num_live.items() if n]
            floor = min(waiting) if waiting else self._last_admitted_counter
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        heapq.heappush(self._heaps.setdefault(tenant, []), (request.priority, seq, request))
        self._live[request.req_id] = request
        self._num_live[tenant] = self._num_live.get(tenant, 0) + 1

    def peek(self) -> Request | None:
        """The next request to admit: the head of the least-served waiting tenant."""
        best: tuple[float, int, int] | None = None
        head: Request | None = None
        for tenant, n in self._num_live.items():
            if not n:
                continue
            heap = self._heaps[tenant]
            while self._live.get(heap[0][2].req_id) is not heap[0][2]:
                heapq.heappop(heap)  # removed while waiting
            priority, seq, req = heap[0]
            # Ties (equal counters) go to the earlier arrival, so equal tenants interleave as FCFS.
            key = (self.counters[tenant], priority, seq)
            if best is None or key < best:
                best, head = key, req
        return head

    def pop(self, request: Request) -> None:
        """Remove `request`, the current `peek()`, as admitted."""
        tenant = tenant_of(request)
        heapq.heappop(self._heaps[tenant])
        self._forget(request, tenant)
        self._last_admitted_counter = self.counters[tenant]

    def remove(self, request: Request) -> None:
        """Remove a waiting request from anywhere in the queue (aborted or finished while waiting)."""
        tenant = tenant_of(request)
        self._forget(request, tenant)
        heap = self._heaps[tenant]
        if len(heap) > 2 * self._num_live[tenant] + 64:  # aborts must not grow the heap forever
            heap[:] = [e for e in heap if self._live.get(e[2].req_id) is e[2]]
            heapq.heapify(heap)

    def _forget(self, request: Request, tenant: int) -> None:
        del self._live[request.req_id]
        self._num_live[tenant] -= 1

    def charge(self, scheduled: Iterable[Request], num_scheduled_tokens: Mapping[str, int]) -> None:
        """Add a step's service to its tenants' counters. Call after the step advanced each request's
        `num_computed_tokens`: the tokens up to the prompt's end are prompt tokens, the rest output."""
        for req in scheduled:
            n = num_scheduled_tokens[req.req_id]
            end = req.num_computed_tokens
            prompt = max(0, min(end, req.num_prompt_tokens) - (end - n))
            tenant = tenant_of(req)
            service = self.prompt_token_weight * prompt + self.output_token_weight * (n - prompt)
            self.counters[tenant] = self.counters.get(tenant, 0.0) + service / share_of(req, self.base_share)
