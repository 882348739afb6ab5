"""Continuous batching under a per-step token budget.

There are no prefill and decode phases: a request has ``num_computed_tokens`` and, each step, the
scheduler decides how many of its not-yet-computed tokens run. Order of service:

1. running requests that are decoding, one token each (they never stall behind a long prompt);
2. running requests part-way through their prompt, the next chunk each;
3. waiting requests, in arrival order, only while a state slot is free.

A request holds its slot from admission until it finishes or is aborted; every exit path frees it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rnnserve.config import SchedulerConfig
from rnnserve.engine.request import FinishReason, Request, RequestStatus
from rnnserve.engine.state_pool import StatePool


@dataclass
class ScheduledRequest:
    """One request's work this step: tokens ``[start, start + num_tokens)`` of prompt ++ output."""

    request: Request
    num_tokens: int

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and not self.request.is_prefilling

    @property
    def completes_prompt(self) -> bool:
        """After this step every known token has been computed, so a new token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # decodes first, then prefill chunks

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: StatePool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput()
        for req in self.running:
            if budget == 0:
                break
            if not req.is_prefilling:
                out.scheduled.append(ScheduledRequest(req, 1))
                budget -= 1
        for req in self.running:
            if budget == 0:
                break
            if req.is_prefilling:
                n = min(req.num_prompt_tokens - req.num_computed_tokens, budget)
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            slot = self.pool.alloc()
            if slot is None:
                break
            req = self.waiting.popleft()
            req.slot = slot
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            n = min(req.num_prompt_tokens - req.num_computed_tokens, budget)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Mark a request finished and give back its slot (idempotent)."""
        if request.status is RequestStatus.FINISHED:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if request.slot is not None:
            self.pool.free(request.slot)
            request.slot = None
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._requests.pop(request.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        """Finish a waiting or running request with ABORT; None if the id is unknown (already done)."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self.finish(request, FinishReason.ABORT)
        return request
