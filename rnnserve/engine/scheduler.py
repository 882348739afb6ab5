"""Continuous batching under a per-step token budget.

There are no prefill and decode phases: a request has ``num_computed_tokens`` and, each step, the
scheduler decides how many of its not-yet-computed tokens run. Order of service:

1. running requests that are decoding, one token each (they never stall behind a long prompt);
2. running requests part-way through their prompt, the next chunk each;
3. waiting requests, only while a state slot is free (and, for a model with attention layers, KV
   blocks for at least the first token of their chunk): requests put back at the front (preempted,
   or children of a parent that ended early) first, then fair across clients
   (``SamplingParams.client``): the oldest request of the client running the fewest requests (ties:
   the client admitted least recently), so one client's backlog never delays another client's new
   request. FIFO within a client; with a single client this is arrival order. When every slot is
   taken, the client running the most requests gives its youngest one back (preempted, see below,
   but queued in its client's turn) if it runs at least two more than the waiting request's client:
   one client's burst cannot hold every slot while another client waits.

First come, first prefilled: a step takes another prompt's chunk (a running request's, then a
waiting one's) only while its prompt tokens are fewer than ``prefill_pack_tokens``. On a CPU (default
64) a step's time grows with its tokens, so packing prompts into one step only makes each wait for
all of them: eight prompts of 200 tokens that arrive together get their first tokens after 1, 2, ..
8 steps of one prompt each (median 4.5 prompt-times) instead of all after one step of eight (8
prompt-times), and no throughput is lost, since a step of 64 or more tokens already keeps the CPU
busy. Shorter prompts share a step until it holds 64 tokens. On a GPU, where a step of many tokens
costs about what one of few does, the default packs prompts up to the whole budget.

Newcomers first (models without attention layers): while some client runs two requests or more, a
waiting request of a client that runs none is admitted in a step of its own (with any other such
newcomers, no decodes), so its first token waits for one short step rather than for a step carrying
another client's whole batch. One client alone never triggers it.

With a paged KV cache a running request that needs a block when none is free preempts the youngest
running request (maybe itself): its blocks and slot go back and it is queued first, to recompute its
prompt and output tokens (as prefill chunks, without sampling again) once it is admitted again.
Blocks held only by the prefix cache count as available: the KV cache reclaims them (evicting cache
entries, least recently used first) before anyone is preempted.

With a prefix cache, admission restores the longest cached prefix of the prompt into the new slot
(at most all but the last prompt token: one always runs, to give logits), and a prefill chunk that
does not finish its prompt ends at a multiple of the cache interval where it can, so that the state
after it is a snapshot worth keeping. With a KV cache, a hit also shares the entry's KV blocks with
the new slot (see ``PrefixCache``). ``n > 1``: a request added with ``fork_of`` its sibling waits
for that sibling's prompt and starts from a copy of its state (``fork``; with a KV cache, the
prompt's full blocks shared and its partial last block copied), sampling from the same logits, so
the prompt is prefilled once. Equal prefixes in flight at the same time are prefilled once too: a
waiting request whose prompt shares more with a running request's prompt still being prefilled than
the cache holds is not admitted yet; that request ends a chunk at the end of the shared part and
snapshots it there, and the waiting one is admitted once it is cached (n identical prompts sent
together, a burst with one system prompt).

A request holds its slot from admission until it finishes or is aborted; every exit path frees it.
When a step's model pass fails, its requests are recomputed one per step (``recompute_alone``), so
the engine can end only the one that fails alone.

The scheduler owns the request lifecycle (as vLLM's ``Scheduler.update_from_output`` does): after a
step it advances progress, records prompt logprobs, appends sampled tokens, applies stop conditions
and frees the slots of finished requests, and builds the ``RequestOutput`` deltas.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rnnserve.config import SchedulerConfig
from rnnserve.engine.kv_cache import KVCache
from rnnserve.engine.prefix_cache import PrefixCache
from rnnserve.engine.request import FinishReason, Request, RequestOutput, RequestStatus, TokenLogprob
from rnnserve.engine.sampler import SamplerOutput, logprob_entries
from rnnserve.engine.state_pool import Snapshot, StatePool

# ``SchedulerConfig.prefill_pack_tokens`` when unset and the states live in host memory: a step of this
# many prompt tokens runs its GEMMs at full speed and spends little of its time on what every step
# costs once (reading the weights, per-op dispatch), so a step that holds it takes no other prompt.
CPU_PREFILL_PACK_TOKENS = 64


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
        """One token that completes the known tokens (a preempted request recomputing its output
        tokens runs them as prefill chunks, sampling only at the last)."""
        return self.num_tokens == 1 and not self.request.is_prefilling and self.completes_prompt

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
    def __init__(
        self,
        config: SchedulerConfig,
        pool: StatePool,
        *,
        max_model_len: int | None = None,
        prefix_cache: PrefixCache | None = None,
        initial_states: Callable[[str], Snapshot] | None = None,
        save_state: Callable[[str, Snapshot, Request], None] | None = None,
        kv_cache: KVCache | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        # Attention layers' blocks: admission needs them too, and running out preempts (see _reserve).
        self.kv_cache = kv_cache
        self.num_preemptions = 0
        self.prefix_cache = prefix_cache
        # name -> saved state (``initial_state`` requests), and the hook that saves one (``save_state``).
        self._initial_states = initial_states
        self._save_state = save_state
        self._forking: list[Request] = []  # n > 1 children waiting for their parent's prompt
        # request id -> prompt lengths to snapshot at (where another request's shared prefix ends), and
        # request id -> (request added before it, length of their shared prefix): see _wait_for_prefix.
        self._snapshot_at: dict[str, set[int]] = {}
        self._shares: dict[str, list[tuple[Request, int]]] = {}
        # After a failed model pass (see ``recompute_alone``): request id -> the number of computed
        # tokens it must reach in steps of its own before it shares steps again.
        self._suspects: dict[str, int] = {}
        # The served limit (the config's, or the model's if smaller): requests stop with LENGTH at it.
        self.max_model_len = config.max_model_len if max_model_len is None else max_model_len
        pack = config.prefill_pack_tokens
        if pack is None:
            pack = CPU_PREFILL_PACK_TOKENS if pool.device.type == "cpu" else config.max_num_batched_tokens
        self.prefill_pack_tokens = pack  # see "First come, first prefilled"
        self.waiting: deque[Request] = deque()
        self._front: set[str] = set()  # ids of waiting requests put back at the front: admitted first
        self._admitted_at: dict[str, int] = {}  # client -> admission count when it was last admitted
        self._num_admitted = 0
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
        return len(self.waiting) + len(self._forking)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._forking)

    def add(self, request: Request, fork_of: str | None = None) -> None:
        """Queue a request. With ``fork_of`` (a sibling with the same prompt, added before it and still
        before the end of its prompt) it starts from a copy of the sibling's state instead of its own
        prefill; otherwise (the sibling is gone or past its prompt) it is queued as any other."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        if request.params.prompt_logprobs is not None:
            self._prompt_logprobs[request.request_id] = [None]
        parent = self._requests.get(fork_of) if fork_of is not None else None
        if parent is not None and self._can_fork(parent, request):
            request.fork_parent = parent
            parent.fork_children.append(request)
            self._forking.append(request)
            return
        self._note_shared_prefixes(request)
        self.waiting.append(request)

    def _note_shared_prefixes(self, request: Request) -> None:
        """Equal prefixes in flight are prefilled once: for every request in flight whose prompt
        shares a prefix with ``request``'s (at most all but its last token, which must run), both
        snapshot at the end of the shared part when they get there, and ``request`` remembers the
        other, to wait for it at admission (``_wait_for_prefix``)."""
        if self.prefix_cache is None or not self._uses_cache(request):
            return
        limit = request.num_prompt_tokens - 1
        shares: list[tuple[Request, int]] = []
        for other in [*self.running, *self.waiting]:
            if (
                not other.is_prefilling
                or not self._uses_cache(other)
                or other.cache_namespace != request.cache_namespace
            ):
                continue
            shared = min(_common_prefix(other.prompt_token_ids, request.prompt_token_ids), limit)
            if shared > other.num_computed_tokens:
                self._snapshot_at.setdefault(other.request_id, set()).add(shared)
                self._snapshot_at.setdefault(request.request_id, set()).add(shared)
                shares.append((other, shared))
        if shares:
            self._shares[request.request_id] = shares

    @staticmethod
    def _can_fork(parent: Request, child: Request) -> bool:
        return (
            parent.fork_parent is None
            and parent.status is not RequestStatus.FINISHED
            and parent.is_prefilling
            and parent.save_state is None
            and child.params.prompt_logprobs is None
            and child.save_state is None
            and parent.initial_state == child.initial_state
            and parent.prompt_token_ids == child.prompt_token_ids
        )

    def schedule(self) -> SchedulerOutput:
        if self._suspects:
            alone = self._schedule_suspect()
            if not alone.is_empty:
                return alone
            self._suspects.clear()  # it cannot run alone (no slot or KV blocks): steps are shared again
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput()
        if self._admit_newcomers(budget, out):
            return out
        preemptions = self.num_preemptions
        # One pass over a copy (reserving KV blocks may preempt, i.e. remove, running requests): the
        # decodes, and in running order the requests with prompt (or recomputed) tokens left.
        chunked: list[Request] = []
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue
            if not self._is_decoding(req):
                chunked.append(req)
            elif self._reserve(req, 1, out):
                out.scheduled.append(ScheduledRequest(req, 1))
                budget -= 1
        prompt_tokens = 0  # of this step's prefill chunks: past prefill_pack_tokens no other prompt joins
        for req in chunked:
            if budget == 0 or prompt_tokens >= self.prefill_pack_tokens:
                break
            if req.status is RequestStatus.RUNNING:  # not preempted since
                n = max(1, self._fit(req, self._chunk_len(req, budget)))
                if self._reserve(req, n, out):
                    out.scheduled.append(ScheduledRequest(req, n))
                    budget -= n
                    prompt_tokens += n
        # No admission in a step that preempted for KV blocks: the blocks just freed are the running requests'.
        deferred: set[str] = set()  # waiting for a running request to prefill their prefix
        while (
            self.waiting
            and budget > 0
            and prompt_tokens < self.prefill_pack_tokens
            and self.num_preemptions == preemptions
        ):
            req = self._next_waiting(deferred)
            if req is None:
                break
            if self._wait_for_prefix(req):
                deferred.add(req.request_id)
                continue
            if len(self.running) >= self.config.max_num_seqs or self.pool.num_free == 0:
                if not self._preempt_for(req, out):
                    break
                preemptions += 1
            n = self._admit(req, budget, out)
            if n == 0:
                break
            budget -= n
            prompt_tokens += n
        return out

    def _admit_newcomers(self, budget: int, out: SchedulerOutput) -> bool:
        """Admit, into ``out`` alone, the waiting requests of clients that run nothing while another
        client runs two or more (see "Newcomers first"); False (``out`` untouched): none to admit."""
        if not self.waiting or len(self.running) < 2 or self.waiting[0].request_id in self._front:
            return False
        if self.kv_cache is not None:  # admission there may need blocks the running requests are about to use
            return False
        deferred: set[str] = set()  # waiting for a running request to prefill their prefix
        prompt_tokens = 0
        while self.waiting and budget > 0 and prompt_tokens < self.prefill_pack_tokens:
            req = self._next_waiting(deferred)
            running = self._running_per_client()
            if req is None or running.get(req.params.client, 0) > 0 or max(running.values(), default=0) < 2:
                break
            if self._wait_for_prefix(req):
                deferred.add(req.request_id)
                continue
            full = len(self.running) >= self.config.max_num_seqs or self.pool.num_free == 0
            if full and not self._preempt_for(req, out):
                break
            n = self._admit(req, budget, out)
            if n == 0:
                break
            budget -= n
            prompt_tokens += n
        return not out.is_empty

    def _admit(self, req: Request, budget: int, out: SchedulerOutput) -> int:
        """Give waiting ``req`` a slot and schedule its first chunk; the chunk's tokens (0: no slot, or
        no KV blocks for even one token, and ``req`` still waits)."""
        slot = self.pool.alloc()
        if slot is None:
            return 0
        self._take_waiting(req)
        req.slot = slot
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._restore_prefix(req)
        # Admitted only with blocks for at least one token; admission never preempts.
        n = self._fit(req, self._chunk_len(req, budget))
        if n == 0:
            self._requeue(req)
            return 0
        self._reserve(req, n, out)
        out.scheduled.append(ScheduledRequest(req, n))
        return n

    def recompute_alone(self, sched: SchedulerOutput) -> None:
        """The model pass of step ``sched`` failed, so its requests' states may be half-written. Each
        goes back to be recomputed (as a preempted request is: its sent tokens stay sent) in steps of
        its own, until it is past the tokens of the failed step; then it shares steps again. A request
        whose step of its own fails is the culprit, which the engine ends alone."""
        for s in sched.scheduled:
            req = s.request
            if req.status is not RequestStatus.RUNNING:
                continue
            self._suspects[req.request_id] = max(self._suspects.get(req.request_id, 0), s.start + s.num_tokens)
            self._requeue(req)

    def _schedule_suspect(self) -> SchedulerOutput:
        """A step of one request from a failed step (see ``recompute_alone``): its next chunk, alone."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        req = next((r for r in [*self.running, *self.waiting] if r.request_id in self._suspects), None)
        if req is None:
            return out
        if req.status is RequestStatus.WAITING:
            self._admit(req, budget, out)
            return out
        n = 1 if self._is_decoding(req) else max(1, self._fit(req, self._chunk_len(req, budget)))
        if self._reserve(req, n, out):
            out.scheduled.append(ScheduledRequest(req, n))
        return out

    def _next_waiting(self, skip: set[str]) -> Request | None:
        """The next waiting request to admit, of those not in ``skip`` (None: none left): the front if
        it was put back there, else the oldest request of the waiting client running the fewest
        requests, of those the one admitted least recently (never admitted counts as longest ago),
        then the earlier in the queue."""
        candidates = [r for r in self.waiting if r.request_id not in skip] if skip else list(self.waiting)
        if not candidates:
            return None
        head = candidates[0]
        if head.request_id in self._front:
            return head
        oldest: dict[str, Request] = {}  # client -> its oldest waiting request (deque order)
        for req in candidates:
            oldest.setdefault(req.params.client, req)
        if len(oldest) == 1:
            return head
        running = self._running_per_client()
        client = min(oldest, key=lambda c: (running.get(c, 0), self._admitted_at.get(c, -1)))
        return oldest[client]

    def _running_per_client(self) -> dict[str, int]:
        running: dict[str, int] = {}
        for r in self.running:
            running[r.params.client] = running.get(r.params.client, 0) + 1
        return running

    def _take_waiting(self, req: Request) -> None:
        """Out of the queue, and its client's turn recorded."""
        self.waiting.remove(req)
        self._front.discard(req.request_id)
        self._num_admitted += 1
        # Only clients with requests here need a turn record, so the map stays as small as the engine's.
        present = {r.params.client for r in self.waiting} | {r.params.client for r in self.running}
        self._admitted_at = {c: t for c, t in self._admitted_at.items() if c in present}
        self._admitted_at[req.params.client] = self._num_admitted

    def _preempt_for(self, req: Request, out: SchedulerOutput) -> bool:
        """No slot for ``req``: the client running the most requests gives one back (its youngest) if
        it runs at least two more than ``req``'s client, so a burst that took every slot shares them
        with a new client at once. The victim is queued (not first) to recompute later. False: no one
        runs more than its share."""
        running = self._running_per_client()
        heavy = max(running, key=running.__getitem__, default=None)
        if heavy is None or running[heavy] < running.get(req.params.client, 0) + 2:
            return False
        # A parent whose forks wait for its prompt keeps its slot (they would start over too).
        candidates = [r for r in self.running if r.params.client == heavy and not r.fork_children]
        if not candidates:
            return False
        victim = max(candidates, key=lambda r: r.arrival_time)
        out.scheduled = [s for s in out.scheduled if s.request is not victim]
        self._requeue(victim, first=False)
        self.num_preemptions += 1
        return True

    @staticmethod
    def _is_decoding(req: Request) -> bool:
        """Its prompt and every output token but the last are computed: one decode step is next."""
        return not req.is_prefilling and req.num_computed_tokens == req.num_tokens - 1

    def _fit(self, req: Request, n: int) -> int:
        """The most of ``n`` next tokens of ``req`` that its blocks plus the free ones can hold."""
        kv = self.kv_cache
        if kv is None:
            return n
        assert req.slot is not None
        room = (kv.num_blocks_of(req.slot) + kv.num_available_blocks) * kv.block_size - req.num_computed_tokens
        return max(0, min(n, room))

    def _reserve(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Blocks for ``req``'s next ``n`` tokens, preempting the youngest running request (maybe
        ``req`` itself) until they fit. False: ``req`` was preempted."""
        kv = self.kv_cache
        if kv is None:
            return True
        assert req.slot is not None
        while not kv.allocate(req.slot, req.num_computed_tokens + n):
            victim = max(self.running, key=lambda r: r.arrival_time)
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Give back a running request's blocks and slot and queue it first, to recompute its prompt
        and output tokens when it is admitted again (the outputs it sent stay sent)."""
        out.scheduled = [s for s in out.scheduled if s.request is not req]
        self._requeue(req)
        self.num_preemptions += 1

    def _requeue(self, req: Request, first: bool = True) -> None:
        """Back to the front of the queue without a slot or blocks, nothing computed; ``first``:
        admitted before anyone else (else in its client's turn, as its oldest request)."""
        assert req.slot is not None
        if self.kv_cache is not None:
            self.kv_cache.free(req.slot)
        self.pool.free(req.slot)
        self.running.remove(req)
        req.slot = None
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = req.num_cached_tokens = 0
        if req.request_id in self._prompt_logprobs:
            self._prompt_logprobs[req.request_id] = [None]  # not sent yet: recorded again from the start
        self.waiting.appendleft(req)
        if first:
            self._front.add(req.request_id)

    def _wait_for_prefix(self, req: Request) -> bool:
        """Whether waiting ``req`` should stay queued because a running request is prefilling a longer
        prefix of its prompt than the cache holds: that request's chunks end at the end of the shared
        part and snapshot it (``_note_shared_prefixes``), and ``req`` restores it once it is cached.
        It stops waiting when the other request is past that point or no longer running (finished,
        aborted, preempted), whether the snapshot got in or not."""
        shares = self._shares.get(req.request_id)
        if not shares or self.prefix_cache is None:
            return False
        ahead = [
            shared
            for other, shared in shares
            if other.status is RequestStatus.RUNNING and other.is_prefilling and other.num_computed_tokens < shared
        ]
        if not ahead:
            return False
        cached = self.prefix_cache.longest_prefix(req.prompt_token_ids, max(ahead), req.cache_namespace)
        return max(ahead) > cached

    def _uses_cache(self, req: Request) -> bool:
        # Prompt logprobs need the logits of every prompt token, which a restored prefix skips.
        return self.prefix_cache is not None and req.params.prompt_logprobs is None

    def _restore_prefix(self, req: Request) -> None:
        """A fresh slot's starting state: the longest cached prefix of the prompt, else the initial
        state the request names, else the fill values the pool reset it to."""
        assert req.slot is not None
        if req.initial_state is not None and self._initial_states is not None:
            self.pool.restore(req.slot, self._initial_states(req.initial_state))
        if self.prefix_cache is not None and self._uses_cache(req):
            hit = self.prefix_cache.restore_longest(
                req.prompt_token_ids, req.slot, limit=req.num_prompt_tokens - 1, namespace=req.cache_namespace
            )
            req.num_computed_tokens = req.num_cached_tokens = hit

    def _chunk_len(self, req: Request, budget: int) -> int:
        """Prompt tokens to run now: as many as the budget allows; a chunk that leaves part of the
        prompt for later ends at the last multiple of the cache interval inside it, if any."""
        start = req.num_computed_tokens
        # A preempted request recomputes its prompt, then its output tokens (never both in one chunk).
        n = min((req.num_prompt_tokens if req.is_prefilling else req.num_tokens) - start, budget)
        if self.prefix_cache is not None and self._uses_cache(req) and start + n < req.num_prompt_tokens:
            boundary = (start + n) // self.prefix_cache.config.interval * self.prefix_cache.config.interval
            if boundary > start:
                n = boundary - start
        # A waiting request shares the prompt up to a snapshot point: the chunk ends there.
        stop = min((p for p in self._snapshot_at.get(req.request_id, ()) if start < p < start + n), default=None)
        if stop is not None and req.is_prefilling:
            n = stop - start
        return n

    def fork(
        self, sampled: list[ScheduledRequest], logits: torch.Tensor | None
    ) -> tuple[list[ScheduledRequest], torch.Tensor | None]:
        """Before sampling: give each n > 1 child whose parent's prompt just completed a copy of the
        parent's state and a row of its logits ``[S, V]``. Children without a free slot are queued
        to prefill on their own."""
        if logits is None or not any(s.request.fork_children for s in sampled):
            return sampled, logits
        rows = list(range(len(sampled)))
        out = list(sampled)
        for b, s in enumerate(sampled):
            parent = s.request
            if not parent.fork_children or not s.completes_prompt or parent.output_token_ids:
                continue
            assert parent.slot is not None
            for child in parent.fork_children:
                self._forking.remove(child)
                child.fork_parent = None
                slot = self.pool.alloc() if len(self.running) < self.config.max_num_seqs else None
                # With a KV cache the child shares the prompt's blocks (needs one for the partial last block).
                kv = self.kv_cache
                if slot is not None and kv is not None and not kv.fork(parent.slot, slot, parent.num_prompt_tokens):
                    self.pool.free(slot)
                    slot = None
                if slot is None:
                    self.waiting.append(child)
                    continue
                self.pool.copy(parent.slot, slot)
                child.slot = slot
                child.status = RequestStatus.RUNNING
                child.num_computed_tokens = child.num_prompt_tokens
                child.num_cached_tokens = parent.num_cached_tokens
                self.running.append(child)
                out.append(ScheduledRequest(child, 0))
                rows.append(b)
            parent.fork_children = []
        if len(rows) == len(sampled):
            return out, logits
        return out, logits[torch.tensor(rows, device=logits.device)]

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
        outputs: list[RequestOutput] = []
        for s in sched.scheduled:
            req = s.request
            if not req.is_prefilling:
                req.num_computed_tokens += s.num_tokens
                continue
            self.prompt_tokens_total += s.num_tokens
            if req.request_id in self._prompt_logprobs:
                self._record_prompt_logprobs(s, prompt_logits.get(req.request_id))
            req.num_computed_tokens += s.num_tokens
            self._after_prompt_chunk(req)
        for s in sched.scheduled if self._suspects else []:
            if s.request.num_computed_tokens >= self._suspects.get(s.request.request_id, s.request.num_tokens + 1):
                del self._suspects[s.request.request_id]  # past the failed step: it shares steps again
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

    def _after_prompt_chunk(self, req: Request) -> None:
        """The slot now holds the state after ``prompt[:num_computed_tokens]``: cache it at interval
        boundaries and at the end of the prompt; save it when the request asked to."""
        n = req.num_computed_tokens
        assert req.slot is not None
        done = n == req.num_prompt_tokens
        cache = self.prefix_cache
        wanted = n in self._snapshot_at.get(req.request_id, ())  # another request shares the prompt up to here
        if cache is not None and self._uses_cache(req) and (done or wanted or n % cache.config.interval == 0):
            cache.insert(req.prompt_token_ids[:n], req.slot, req.cache_namespace)
        if done and req.save_state is not None and self._save_state is not None:
            self._save_state(req.save_state, self.pool.snapshot(req.slot), req)

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
            num_cached_tokens=req.num_cached_tokens,
        )

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Mark a request finished and give back its slot (idempotent)."""
        if request.status is RequestStatus.FINISHED:
            return
        self._suspects.pop(request.request_id, None)
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.fork_parent is not None:
            self._forking.remove(request)
            request.fork_parent.fork_children.remove(request)
            request.fork_parent = None
        else:
            self.waiting.remove(request)
            self._front.discard(request.request_id)
        self._snapshot_at.pop(request.request_id, None)
        self._shares.pop(request.request_id, None)
        # Children of a parent that ends before its prompt does prefill on their own, first in line.
        for child in reversed(request.fork_children):
            self._forking.remove(child)
            child.fork_parent = None
            self.waiting.appendleft(child)
            self._front.add(child.request_id)
        request.fork_children = []
        if request.slot is not None:
            if reason is not FinishReason.ERROR:
                self._cache_final_state(request)
            if self.kv_cache is not None:
                self.kv_cache.free(request.slot)
            self.pool.free(request.slot)
            request.slot = None
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._requests.pop(request.request_id, None)

    def _cache_final_state(self, req: Request) -> None:
        """The slot holds the state after the tokens fed so far: the prompt and every output token
        but the last one (a sampled token is fed at the next step, which a finished request never
        runs). That prefix is what the next chat turn resends, before its new message."""
        if self.prefix_cache is None or not self._uses_cache(req) or req.num_computed_tokens == 0:
            return
        assert req.slot is not None
        fed = [*req.prompt_token_ids, *req.output_token_ids][: req.num_computed_tokens]
        self.prefix_cache.insert(fed, req.slot, req.cache_namespace)

    def abort(self, request_id: str) -> Request | None:
        """Finish a waiting or running request with ABORT; None if the id is unknown (already done)."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self.finish(request, FinishReason.ABORT)
        return request


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists (a binary search over slice
    comparisons, which run in C: a shared system prompt of thousands of tokens costs no Python loop)."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; the answer is at most hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
