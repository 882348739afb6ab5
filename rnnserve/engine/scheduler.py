"""Continuous batching under a per-step token budget.

There are no prefill and decode phases: a request has ``num_computed_tokens`` and, each step, the
scheduler decides how many of its not-yet-computed tokens run. Order of service:

1. running requests that are decoding, one token each (they never stall behind a long prompt);
2. running requests part-way through their prompt, the next chunk each;
3. waiting requests, in arrival order, only while a state slot is free.

A request holds its slot from admission until it finishes or is aborted; every exit path frees it.

The scheduler owns the request lifecycle (as vLLM's ``Scheduler.update_from_output`` does): after a
step it advances progress, records prompt logprobs, appends sampled tokens, applies stop conditions
and frees the slots of finished requests, and builds the ``RequestOutput`` deltas.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from rnnserve.config import SchedulerConfig
from rnnserve.engine.request import FinishReason, Request, RequestOutput, RequestStatus, TokenLogprob
from rnnserve.engine.sampler import SamplerOutput, logprob_entries
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
    def __init__(self, config: SchedulerConfig, pool: StatePool, *, max_model_len: int | None = None) -> None:
        self.config = config
        self.pool = pool
        # The served limit (the config's, or the model's if smaller): requests stop with LENGTH at it.
        self.max_model_len = config.max_model_len if max_model_len is None else max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}
        # request id -> prompt logprobs so far ([0] is None: the first token has no context), sent
        # with the request's first output.
        self._prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}
        self.prompt_tokens_total = 0  # prompt tokens run through the model
        self.generation_tokens_total = 0

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
        if request.params.prompt_logprobs is not None:
            self._prompt_logprobs[request.request_id] = [None]

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

    def update_from_output(
        self,
        sched: SchedulerOutput,
        prompt_logits: dict[str, torch.Tensor],
        to_sample: list[ScheduledRequest],
        sampled: SamplerOutput | None,
    ) -> list[RequestOutput]:
        """After a step: advance progress, record prompt logprobs, append the sampled tokens (row b
        of ``sampled`` belongs to ``to_sample[b]``), stop and free finished requests. Returns the
        output delta of every request that got a token."""
        for s in sched.scheduled:
            req = s.request
            if req.is_prefilling:
                self.prompt_tokens_total += s.num_tokens
                if req.request_id in self._prompt_logprobs:
                    self._record_prompt_logprobs(s, prompt_logits.get(req.request_id))
            req.num_computed_tokens += s.num_tokens
        outputs: list[RequestOutput] = []
        if sampled is None:
            return outputs
        for b, s in enumerate(to_sample):
            req = s.request
            token = sampled.token_ids[b]
            req.output_token_ids.append(token)
            self.generation_tokens_total += 1
            reason = self._stop_reason(req, token)
            if reason is not None:
                self.finish(req, reason)
            lp = sampled.logprobs[b]
            outputs.append(self.make_output(req, [token], None if lp is None else [lp]))
        return outputs

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if not p.ignore_eos and token == req.eos_token_id:
            return FinishReason.STOP
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if p.max_tokens is not None and len(req.output_token_ids) >= p.max_tokens:
            return FinishReason.LENGTH
        if self.max_model_len is not None and req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _record_prompt_logprobs(self, s: ScheduledRequest, logits: torch.Tensor | None) -> None:
        """Logits at prompt position i give the logprob of prompt token i + 1 (raw log_softmax)."""
        req = s.request
        if logits is None:
            return
        targets = [req.token_at(i + 1) for i in range(s.start, s.start + s.num_tokens) if i + 1 < req.num_prompt_tokens]
        if not targets:
            return
        n = len(targets)
        lp = torch.log_softmax(logits[:n].float(), dim=-1)  # [n, V]
        chosen = torch.tensor(targets, device=lp.device)
        num_top = min(req.params.prompt_logprobs or 0, lp.shape[-1])
        self._prompt_logprobs[req.request_id].extend(logprob_entries(lp, chosen, num_top))

    def make_output(
        self, req: Request, tokens: list[int], logprobs: list[TokenLogprob] | None, error: str | None = None
    ) -> RequestOutput:
        """A request's output delta; prompt logprobs go out once, with its first token or its end."""
        finished = req.finish_reason is not None
        prompt_lps = None
        if req.request_id in self._prompt_logprobs and (tokens or finished):
            prompt_lps = self._prompt_logprobs.pop(req.request_id)
        if logprobs is None and req.params.logprobs is not None:
            logprobs = []
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            new_logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            finished=finished,
            finish_reason=req.finish_reason,
            prompt_logprobs=prompt_lps,
            error=error,
        )

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
