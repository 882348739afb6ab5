"""Turns a step's schedule into model calls: one DecodeBatch and one packed PrefillBatch.

Requests with exactly one token to run that have finished their prompt go to ``decode`` (the call a
CUDA-graph wrapper replaces, through ``_run_decode``); every prompt chunk goes into one packed
variable-length ``prefill``. Logits come back per request, only where somebody needs them: the last
token of a chunk that completes a prompt (to sample from), or every token of the chunk when the
request asked for prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnserve.config import RunnerConfig
from rnnserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from rnnserve.engine.state_pool import StatePool
from rnnserve.models.base import DecodeBatch, PrefillBatch, RecurrentLM


@dataclass
class RunnerOutput:
    # request id -> logits [n, V] float32: n = 1 for a decode or a completed prompt (the token to
    # sample from is the last row), n = chunk length with prompt logprobs. Absent: no logits needed.
    logits: dict[str, torch.Tensor]


class ModelRunner:
    def __init__(self, model: RecurrentLM, pool: StatePool, config: RunnerConfig) -> None:
        self.model = model
        self.pool = pool
        self.config = config
        self.device = pool.device

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        decodes = [s for s in sched.scheduled if s.is_decode]
        prefills = [s for s in sched.scheduled if not s.is_decode]
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            if decodes:
                logits = self._run_decode(self._decode_batch(decodes))  # [B, V]
                for i, s in enumerate(decodes):
                    out[s.request.request_id] = logits[i : i + 1]
            if prefills:
                batch, rows = self._prefill_batch(prefills)
                logits = self.model.prefill(batch, self.pool.states)  # [M, V]
                for s, (lo, hi) in zip(prefills, rows):
                    if hi > lo:
                        out[s.request.request_id] = logits[lo:hi]
        return RunnerOutput(logits=out)

    def _run_decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One decode step: logits [B, V]. The single seam a compiled / CUDA-graph runner replaces."""
        return self.model.decode(batch, self.pool.states)

    def _decode_batch(self, decodes: list[ScheduledRequest]) -> DecodeBatch:
        ids = [s.request.token_at(s.start) for s in decodes]
        pos = [s.start for s in decodes]
        slots = [s.request.slot for s in decodes]
        return DecodeBatch(
            input_ids=self._tensor(ids),
            positions=self._tensor(pos),
            slot_ids=self._tensor(slots),
        )

    def _prefill_batch(self, prefills: list[ScheduledRequest]) -> tuple[PrefillBatch, list[tuple[int, int]]]:
        """The packed batch and, per sequence, its rows [lo, hi) in the returned logits."""
        ids: list[int] = []
        pos: list[int] = []
        cu = [0]
        logit_idx: list[int] = []
        rows: list[tuple[int, int]] = []
        for s in prefills:
            req = s.request
            end = s.start + s.num_tokens
            ids.extend(req.token_at(i) for i in range(s.start, end))
            pos.extend(range(s.start, end))
            lo = len(logit_idx)
            if req.params.prompt_logprobs is not None and req.is_prefilling:
                logit_idx.extend(range(cu[-1], cu[-1] + s.num_tokens))
            elif s.completes_prompt:
                logit_idx.append(cu[-1] + s.num_tokens - 1)
            rows.append((lo, len(logit_idx)))
            cu.append(cu[-1] + s.num_tokens)
        batch = PrefillBatch(
            input_ids=self._tensor(ids),
            positions=self._tensor(pos),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=self.device),
            slot_ids=self._tensor([s.request.slot for s in prefills]),
            logits_indices=self._tensor(logit_idx),
            max_seqlen=max(s.num_tokens for s in prefills),
        )
        return batch, rows

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
