"""Turns a step's schedule into one model call: ``decode``, ``prefill`` or ``mixed``.

Requests with exactly one token to run that have finished their prompt are decode rows; every prompt
chunk goes into one packed variable-length PrefillBatch. A step of decodes only calls ``decode`` (the
call a CUDA-graph or compiled wrapper replaces, through ``_run_decode``), a step of prompt chunks only
``prefill``, and a step with both one ``mixed`` pass (decode rows first), so a family that implements
it reads every weight once per step. The step metadata (``cu_seqlens`` and its host copy, slots,
logits rows) is built here once from host lists. Logits come back per request, only where somebody
needs them: the last token of a chunk that completes a prompt (to sample from), or every token of
the chunk when the request asked for prompt logprobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rnnserve.config import RunnerConfig
from rnnserve.engine.compiled import CompiledDecoder
from rnnserve.engine.cpu_decode import fused_decoder
from rnnserve.engine.cpu_decode_auto import auto_decoder
from rnnserve.engine.cuda_graph import CUDAGraphDecoder, eager_decoder
from rnnserve.engine.kv_cache import KVCache
from rnnserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from rnnserve.engine.state_pool import StatePool
from rnnserve.models.base import DecodeBatch, MixedBatch, PagedKVMetadata, PrefillBatch, RecurrentLM

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    # The requests that get a new token this step (every known token of theirs is now computed), in
    # the row order of sample_logits: decodes first, then prompts completed by this step's chunk.
    sampled: list[ScheduledRequest]
    sample_logits: torch.Tensor | None  # [len(sampled), V] float32; None when nobody samples
    # request id -> logits [n, V] of every token of its prompt chunk, for requests with prompt_logprobs.
    prompt_logits: dict[str, torch.Tensor]


class ModelRunner:
    def __init__(
        self, model: RecurrentLM, pool: StatePool, config: RunnerConfig, kv_cache: KVCache | None = None
    ) -> None:
        self.model = model
        self.pool = pool
        self.config = config
        self.device = pool.device
        # The paged KV cache of a model with attention layers: each batch carries its step metadata.
        self.kv_cache = kv_cache
        self._decoder = self._make_decoder()

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        decodes: list[ScheduledRequest] = []
        prefills: list[ScheduledRequest] = []
        for s in sched.scheduled:
            (decodes if s.is_decode else prefills).append(s)
        n = len(decodes)
        sampled = list(decodes)
        prompt_logits: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            if not prefills:
                logits = self._run_decode(self._decode_batch(decodes)) if decodes else None  # [n, V]
                return RunnerOutput(sampled, logits, prompt_logits)
            batch, rows = self._prefill_batch(prefills)
            if decodes:
                logits = self.model.mixed(MixedBatch.pack(self._decode_batch(decodes), batch), self.pool.states)
            else:
                logits = self.model.prefill(batch, self.pool.states)
            # logits [n + M, V]: the decode rows, then the prefill's rows (each request's [lo, hi)).
            sample_rows = list(range(n))
            for s, (lo, hi) in zip(prefills, rows):
                if s.request.params.prompt_logprobs is not None and hi > lo:
                    prompt_logits[s.request.request_id] = logits[n + lo : n + hi]
                if s.completes_prompt:
                    sampled.append(s)
                    sample_rows.append(n + hi - 1)
        # One [S, V] tensor for the sampler, gathered only when some rows are not sampled.
        if not sample_rows:
            sample_logits = None
        elif sample_rows == list(range(logits.shape[0])):
            sample_logits = logits
        else:
            sample_logits = logits.index_select(0, torch.tensor(sample_rows, device=logits.device))
        return RunnerOutput(sampled=sampled, sample_logits=sample_logits, prompt_logits=prompt_logits)

    def _run_decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One decode step: logits [B, V]. The single seam a compiled / CUDA-graph runner replaces."""
        return self._decoder(batch)

    def _decode_batch(self, decodes: list[ScheduledRequest]) -> DecodeBatch:
        # A decode row feeds its last known token (an output token: its prompt is done) at position
        # num_computed_tokens.
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        for s in decodes:
            req = s.request
            ids.append(req.output_token_ids[-1])
            pos.append(req.num_computed_tokens)
            slots.append(req.slot)  # type: ignore[arg-type]  # a running request holds a slot
        return DecodeBatch(
            input_ids=self._tensor(ids),
            positions=self._tensor(pos),
            slot_ids=self._tensor(slots),
            kv=self._kv_metadata(decodes),
        )

    def _kv_metadata(self, scheduled: list[ScheduledRequest]) -> PagedKVMetadata | None:
        """Block tables, lengths and slot mapping of the step's sequences (the scheduler has allocated
        their blocks); None for a model without attention layers."""
        if self.kv_cache is None:
            return None
        return self.kv_cache.metadata(
            [s.request.slot for s in scheduled],  # type: ignore[misc]
            [s.start + s.num_tokens for s in scheduled],
            [s.num_tokens for s in scheduled],
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
            cu_seqlens_cpu=tuple(cu),
            kv=self._kv_metadata(prefills),
        )
        return batch, rows

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _make_decoder(self) -> Callable[[DecodeBatch], torch.Tensor]:
        """CUDA graphs on CUDA. On the CPU by ``cpu_decode``: "fused", the fused C++ decode, its kernels
        built (first use) and the weights packed here at start-up; "auto", the fused decode where it
        applies, prepared on a background thread while the torch path decodes (``cpu_decode_auto``);
        "torch", the torch ops, compiled with ``compile_cpu_decode``. Eager with ``enforce_eager``."""
        states = self.pool.states
        mode = self.config.cpu_decode if self.device.type == "cpu" else "torch"
        if mode == "auto" and (self.config.enforce_eager or self.config.compile_cpu_decode):
            why = "--enforce-eager" if self.config.enforce_eager else "--compile"
            logger.info("--cpu-decode auto: decoding with the torch path: %s", why)
            mode = "torch"
        if self.config.enforce_eager:
            return eager_decoder(self.model, states)
        if mode == "fused":
            # None (reason logged): the torch path below. The LLaMA baseline's reads the batch's block table.
            fused = fused_decoder(self.model, states)
            if fused is not None:
                return fused
        if mode == "auto":
            return auto_decoder(self.model, states, eager_decoder(self.model, states))
        if self.kv_cache is not None:
            # The CUDA-graph and compiled decoders build their batches without block tables.
            logger.info("decoding eagerly: the model has attention layers over the paged KV cache")
            return eager_decoder(self.model, states)
        if self.device.type == "cuda":
            graphs = CUDAGraphDecoder(self.model, states, min(self.config.max_graph_batch_size, self.pool.capacity))
            try:
                graphs.capture()
            except Exception:  # a decode that syncs with the host cannot be captured: serve it eagerly
                logger.exception("CUDA-graph capture failed; decoding eagerly")
                return eager_decoder(self.model, states)
            return graphs
        if self.config.compile_cpu_decode:
            compiled = CompiledDecoder(self.model, states)
            compiled.warmup()
            return compiled
        return eager_decoder(self.model, states)
