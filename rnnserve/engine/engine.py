"""The engine: ``LLMEngine`` (synchronous step loop) and ``AsyncEngine`` (its asyncio front).

``LLMEngine.step`` is schedule -> run -> sample -> update. ``AsyncEngine`` runs that loop in one
background thread, which sleeps on a condition while there is nothing to do; requests and aborts
cross into it through a locked command list, outputs cross back with ``loop.call_soon_threadsafe``
into one ``asyncio.Queue`` per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rnnserve.config import (
    KVCacheConfig,
    ModelConfig,
    PrefixCacheConfig,
    RunnerConfig,
    SchedulerConfig,
    StatePoolConfig,
)
from rnnserve.engine.kv_cache import KVCache
from rnnserve.engine.prefix_cache import PrefixCache, state_identity
from rnnserve.engine.request import FinishReason, Request, RequestOutput, SamplingParams, TokenLogprob
from rnnserve.engine.runner import ModelRunner
from rnnserve.engine.sampler import Sampler, SamplerOutput
from rnnserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from rnnserve.engine.state_pool import Snapshot, StatePool
from rnnserve.engine.state_store import StateNotFoundError, StateStore, check_state_name
from rnnserve.models.base import RecurrentLM
from rnnserve.models.loader import LoadedModel, load_model

logger = logging.getLogger(__name__)


class EngineInputError(ValueError):
    """A prompt the engine cannot take (empty, token id out of vocab, longer than max_model_len)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics; immutable, so handing it to another thread is safe."""

    num_running: int
    num_waiting: int
    num_slots: int  # real slots (the padding slot excluded)
    slots_used: int
    state_bytes_per_slot: int
    state_pool_usage: float  # used real slots / real slots (0..1)
    prompt_tokens_total: int
    generation_tokens_total: int
    num_steps: int
    last_step_seconds: float
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens restored from a snapshot
    prefix_cache_device_bytes: int = 0
    prefix_cache_host_bytes: int = 0
    prefix_cache_entries: int = 0
    prefix_cache_evictions: int = 0
    kv_cache_blocks: int = 0  # real KV blocks (0 without attention layers)
    kv_cache_blocks_used: int = 0  # in some sequence's block table
    kv_cache_blocks_cached: int = 0  # held only by prefix-cache entries (reclaimed before any preemption)
    kv_bytes_per_token: int = 0  # KV bytes one token of a sequence takes, all attention layers
    num_preemptions: int = 0  # requests preempted (requeued to recompute) for lack of KV blocks


def _min_len(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


class LLMEngine:
    """The synchronous core. Not thread-safe: one thread calls everything (``AsyncEngine`` sees to it)."""

    def __init__(
        self,
        model: RecurrentLM,
        pool_config: StatePoolConfig,
        scheduler_config: SchedulerConfig,
        runner_config: RunnerConfig,
        eos_token_id: int | None,
        model_max_len: int | None = None,
        prefix_cache_config: PrefixCacheConfig | None = None,  # None or disabled: no prefix cache
        state_dir: str | None = None,  # named initial states (``initial_state``, ``save_state``)
        kv_cache_config: KVCacheConfig | None = None,  # attention layers' blocks (None: the defaults)
    ) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.vocab_size = model.vocab_size
        self.max_model_len = _min_len(scheduler_config.max_model_len, model_max_len)
        if self.max_model_len is not None:
            model.limit_context(self.max_model_len)
        self.pool = StatePool(model.state_specs(), pool_config, model.device)
        self.kv_cache = self._make_kv_cache(kv_cache_config or KVCacheConfig())
        identity = state_identity(model, self.pool, self.kv_cache)
        # With attention layers, cache entries and n > 1 forks also share the paged KV cache's blocks.
        self.prefix_cache = (
            PrefixCache(self.pool, prefix_cache_config, identity, self.kv_cache)
            if prefix_cache_config is not None and prefix_cache_config.enabled
            else None
        )
        self.state_store = StateStore(Path(state_dir), identity, self.pool) if state_dir is not None else None
        self._state_errors: dict[str, str] = {}  # request id -> why its state was not saved
        self.scheduler = Scheduler(
            scheduler_config,
            self.pool,
            max_model_len=self.max_model_len,
            prefix_cache=self.prefix_cache,
            initial_states=self.state_store.get if self.state_store is not None else None,
            save_state=self._save_state,
            kv_cache=self.kv_cache,
        )
        self.runner = ModelRunner(model, self.pool, runner_config, self.kv_cache)
        self.sampler = Sampler(model.vocab_size, model.device)
        self._pending: list[RequestOutput] = []  # outputs made outside a step (aborts), sent with the next
        self._num_steps = 0
        self._last_step_seconds = 0.0

    def _make_kv_cache(self, config: KVCacheConfig) -> KVCache | None:
        """The paged KV cache of a model with attention layers (None without). A sequence can never
        outgrow what the cache holds for one: max_model_len is lowered to it."""
        specs = self.model.kv_specs()
        if not specs:
            return None
        # Attention positions are bounded by the model's own limit (RoPE, learned positions) too.
        limit = _min_len(self.max_model_len, getattr(self.model, "max_model_len", None))
        kv = KVCache(specs, config, self.pool.num_slots, limit, self.model.device)
        if self.max_model_len is None or kv.max_tokens_per_seq < self.max_model_len:
            logger.info("max_model_len %s -> %d (the KV cache's room for one sequence)", limit, kv.max_tokens_per_seq)
            self.max_model_len = kv.max_tokens_per_seq
        logger.info(
            "KV cache: %d blocks of %d tokens, %d bytes each (%.1f MiB)",
            kv.num_blocks,
            kv.block_size,
            kv.bytes_per_block,
            kv.total_bytes / 2**20,
        )
        return kv

    def validate(self, prompt_token_ids: list[int]) -> None:
        """Raise EngineInputError for a prompt the engine cannot serve."""
        if not prompt_token_ids:
            raise EngineInputError("the prompt is empty", "prompt")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise EngineInputError(f"token id {bad} is out of the vocabulary (0..{self.vocab_size - 1})", "prompt")
        if self.max_model_len is not None and len(prompt_token_ids) >= self.max_model_len:
            # A prompt of exactly max_model_len tokens would exceed it with its first generated token.
            raise EngineInputError(
                f"the prompt has {len(prompt_token_ids)} tokens; max_model_len={self.max_model_len} leaves room "
                f"for at most {self.max_model_len - 1} and one generated token",
                "prompt",
            )

    def validate_state_name(self, name: str, param: str = "initial_state") -> None:
        """EngineInputError unless ``name`` is a saved state this model can start from."""
        self._check_states_supported(param)
        if self.state_store is None:
            raise EngineInputError("this server has no state folder (start it with --state-dir)", param)
        try:
            self.state_store.get(name)
        except StateNotFoundError as exc:
            raise EngineInputError(str(exc), param) from exc

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        fork_of: str | None = None,
        initial_state: str | None = None,
        save_state: str | None = None,
    ) -> None:
        """Queue a request. ``fork_of``: the request id of an n > 1 sibling with the same prompt,
        added just before, whose prefill this one shares; ``initial_state``: start from that saved
        state; ``save_state``: save the state after the prompt under that name."""
        self.validate(prompt_token_ids)
        if request_id in self.scheduler:
            raise EngineInputError(f"request id {request_id!r} is already running", "request_id")
        if initial_state is not None:
            self.validate_state_name(initial_state)
        if save_state is not None:
            self._check_states_supported("name")
            if self.state_store is None:
                raise EngineInputError("this server has no state folder (start it with --state-dir)", "name")
            try:
                check_state_name(save_state)
            except StateNotFoundError as exc:
                raise EngineInputError(str(exc), "name") from exc
        req = Request(
            request_id,
            list(prompt_token_ids),
            params,
            eos_token_id=self.eos_token_id,
            initial_state=initial_state,
            save_state=save_state,
        )
        if initial_state is not None:
            assert self.state_store is not None
            req.cache_namespace = f"state:{initial_state}@{self.state_store.version(initial_state)}"
        self.scheduler.add(req, fork_of=fork_of)

    def _check_states_supported(self, param: str) -> None:
        if self.kv_cache is not None:
            raise EngineInputError(
                "saved states hold recurrent state only; this model's attention layers keep a KV cache", param
            )

    def _save_state(self, name: str, snapshot: Snapshot, req: Request) -> None:
        assert self.state_store is not None
        try:
            self.state_store.save(name, snapshot, req.num_prompt_tokens)
        except (OSError, ValueError) as exc:
            logger.warning("cannot save the state %r: %s", name, exc)
            self._state_errors[req.request_id] = f"the state {name!r} was not saved: {exc}"

    def abort_request(self, request_id: str) -> None:
        req = self.scheduler.abort(request_id)
        if req is not None:
            self._release(req)
            self._pending.append(self._output(req, [], None))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        """Schedule -> run -> sample -> update; the outputs (deltas) of every request that moved."""
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if not sched.is_empty:
            try:
                run = self.runner.execute(sched)
                to_sample, logits = self.scheduler.fork(run.sampled, run.sample_logits)
            except Exception as exc:  # states may be half-written: the step's requests cannot go on as they are
                return outputs + self._failed_step(sched, exc)
            sampled = None
            if logits is not None:
                sched, to_sample, sampled, failed = self._sample_isolated(sched, to_sample, logits)
                outputs += failed
            step_outputs = self.scheduler.update_from_output(sched, run.prompt_logits, to_sample, sampled)
            self._release_finished(step_outputs)
            for out in step_outputs if self._state_errors else []:
                out.error = self._state_errors.pop(out.request_id, out.error)
            outputs += step_outputs
            self._num_steps += 1
            self._last_step_seconds = time.perf_counter() - t0
            if logger.isEnabledFor(logging.DEBUG):
                self._log_step(sched, self._last_step_seconds)
        return outputs

    def _log_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """One line per step at debug level (``--log-level debug``): what ran and how long it took, to
        see where a served request's time goes (a prompt waiting behind others, chunk sizes)."""
        decodes = sum(1 for s in sched.scheduled if s.is_decode)
        chunks = [f"{s.request.request_id}:{s.num_tokens}" for s in sched.scheduled if not s.is_decode]
        logger.debug(
            "step %d: %d decodes, prefill [%s], %d waiting, %.3f s",
            self._num_steps,
            decodes,
            " ".join(chunks),
            self.scheduler.num_waiting,
            seconds,
        )

    def _sample_isolated(
        self, sched: SchedulerOutput, to_sample: list[ScheduledRequest], logits: torch.Tensor
    ) -> tuple[SchedulerOutput, list[ScheduledRequest], SamplerOutput, list[RequestOutput]]:
        """Sample the batch (``logits`` [B, V]); if that fails, sample row by row so only the rows that
        fail (a request whose parameters the sampler cannot take) finish with ERROR, and the others go on.

        Returns the step without the failed requests, the rows that got a token, their tokens, and
        the failed requests' final outputs."""
        try:
            return sched, to_sample, self.sampler(logits, [s.request for s in to_sample]), []
        except Exception:
            logger.exception("sampling a batch of %d failed; retrying row by row", len(to_sample))
        kept: list[ScheduledRequest] = []
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        failed: list[RequestOutput] = []
        for b, s in enumerate(to_sample):
            try:
                one = self.sampler(logits[b : b + 1], [s.request])  # [1, V]
            except Exception as exc:
                logger.exception("request %s failed in the sampler", s.request.request_id)
                self.scheduler.finish(s.request, FinishReason.ERROR)
                self._release(s.request)
                failed.append(self._output(s.request, [], None, error=f"{type(exc).__name__}: {exc}"))
                continue
            kept.append(s)
            tokens += one.token_ids
            logprobs += one.logprobs
        done = {out.request_id for out in failed}
        sched = dataclasses.replace(sched, scheduled=[s for s in sched.scheduled if s.request.request_id not in done])
        return sched, kept, SamplerOutput(token_ids=tokens, logprobs=logprobs), failed

    def _failed_step(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """The model pass failed. A request alone in its step ends with ERROR; the requests of a
        shared step are recomputed, each in steps of its own (``Scheduler.recompute_alone``), so only
        one that fails alone ends, and the others go on with the tokens they would have had."""
        if len(sched.scheduled) == 1:
            logger.exception("engine step failed; finishing request %s", sched.scheduled[0].request.request_id)
            return self._fail(sched, exc)
        logger.exception("engine step of %d requests failed; recomputing each alone", len(sched.scheduled))
        self.scheduler.recompute_alone(sched)
        return []

    def _fail(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        outputs = []
        for s in sched.scheduled:
            self.scheduler.finish(s.request, FinishReason.ERROR)
            self._release(s.request)
            outputs.append(self._output(s.request, [], None, error=f"{type(exc).__name__}: {exc}"))
        return outputs

    def fail_all(self, exc: BaseException) -> list[RequestOutput]:
        """Finish every request with ERROR (the step loop hit something it cannot attribute)."""
        outputs = []
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(req, FinishReason.ERROR)
            self._release(req)
            outputs.append(self._output(req, [], None, error=f"{type(exc).__name__}: {exc}"))
        return outputs

    def abort_all(self) -> list[RequestOutput]:
        """Abort every request (shutdown); their final outputs, and any still pending."""
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            self.abort_request(req.request_id)
        outputs, self._pending = self._pending, []
        return outputs

    def flush(self) -> None:
        """Wait until the prefix cache folder (``--prefix-cache-dir``) holds every snapshot inserted so
        far: its writes run in a background thread (shutdown calls this)."""
        if self.prefix_cache is not None:
            self.prefix_cache.flush()

    def _release(self, req: Request) -> None:
        self.sampler.release(req.request_id)

    def _release_finished(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self.sampler.release(out.request_id)

    def _output(
        self, req: Request, tokens: list[int], logprobs: list[TokenLogprob] | None, error: str | None = None
    ) -> RequestOutput:
        return self.scheduler.make_output(req, tokens, logprobs, error)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_slots=self.pool.capacity,
            slots_used=self.pool.num_used,
            state_bytes_per_slot=self.pool.bytes_per_slot,
            state_pool_usage=self.pool.usage,
            prompt_tokens_total=self.scheduler.prompt_tokens_total,
            generation_tokens_total=self.scheduler.generation_tokens_total,
            num_steps=self._num_steps,
            last_step_seconds=self._last_step_seconds,
            **self._prefix_cache_stats(),
            **self._kv_cache_stats(),
            num_preemptions=self.scheduler.num_preemptions,
        )

    def _kv_cache_stats(self) -> dict[str, int]:
        kv = self.kv_cache
        if kv is None:
            return {}
        return {
            "kv_cache_blocks": kv.num_blocks,
            "kv_cache_blocks_used": kv.num_used_blocks,
            "kv_cache_blocks_cached": kv.num_cached_blocks,
            "kv_bytes_per_token": kv.bytes_per_block // kv.block_size,
        }

    def _prefix_cache_stats(self) -> dict[str, int]:
        if self.prefix_cache is None:
            return {}
        c = self.prefix_cache.stats()
        return {
            "prefix_cache_queries": c.queries,
            "prefix_cache_hits": c.hits,
            "prefix_cache_device_bytes": c.device_bytes,
            "prefix_cache_host_bytes": c.host_bytes,
            "prefix_cache_entries": c.device_entries + c.host_entries,
            "prefix_cache_evictions": c.evictions,
        }


def final_output(request_id: str, reason: FinishReason, error: str | None) -> RequestOutput:
    """A closing output for a request the engine never saw or no longer holds."""
    return RequestOutput(
        request_id=request_id,
        new_token_ids=[],
        new_logprobs=None,
        num_prompt_tokens=0,
        num_output_tokens=0,
        finished=True,
        finish_reason=reason,
        error=error,
    )


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    fork_of: str | None = None
    initial_state: str | None = None
    save_state: str | None = None


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs ``LLMEngine.step`` in one background thread; per-request async output streams."""

    # generate() takes fork_of / initial_state / save_state (the server passes them only then).
    takes_state_options = True

    def state_names(self) -> list[str]:
        """The saved states in ``--state-dir`` (none without one)."""
        store = self.engine.state_store
        return store.names() if store is not None else []

    def __init__(self, engine: LLMEngine, loaded: LoadedModel | None = None) -> None:
        self.engine = engine
        self.loaded = loaded
        self.max_model_len: int | None = engine.max_model_len
        self.vocab_size: int = engine.vocab_size
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        # request id -> (the event loop its consumer runs on, its output queue). Written only on the
        # loop, read by the engine thread with single dict lookups.
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._stats = engine.stats()

    @classmethod
    def from_configs(
        cls,
        model_config: ModelConfig,
        pool_config: StatePoolConfig,
        scheduler_config: SchedulerConfig,
        runner_config: RunnerConfig,
        prefix_cache_config: PrefixCacheConfig | None = None,
        state_dir: str | None = None,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> AsyncEngine:
        loaded = load_model(model_config)
        engine = LLMEngine(
            loaded.model,
            pool_config,
            scheduler_config,
            runner_config,
            loaded.eos_token_id,
            model_max_len=loaded.max_model_len,
            prefix_cache_config=prefix_cache_config,
            state_dir=state_dir,
            kv_cache_config=kv_cache_config,
        )
        return cls(engine, loaded)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        if self.is_running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run_loop, name="rnnserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the loop thread; requests still in flight end with FinishReason.ABORT."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        with self._cond:
            self._commands = []
        self.engine.abort_all()
        await asyncio.to_thread(self.engine.flush)
        for request_id, (_, queue) in list(self._queues.items()):
            queue.put_nowait(final_output(request_id, FinishReason.ABORT, "the engine was shut down"))
        self._stats = self.engine.stats()

    def stats(self) -> EngineStats:
        return self._stats

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        fork_of: str | None = None,
        initial_state: str | None = None,
        save_state: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Validation errors raise EngineInputError at the first __anext__.
        Stopping early (aclose, cancellation) aborts the request and frees its slot. The keywords are
        ``LLMEngine.add_request``'s."""
        add = _Add(request_id, list(prompt_token_ids), params, fork_of, initial_state, save_state)
        return self._generate(add)

    async def _generate(self, add: _Add) -> AsyncIterator[RequestOutput]:
        request_id = add.request_id
        self.engine.validate(add.prompt_token_ids)
        if add.initial_state is not None:
            self.engine.validate_state_name(add.initial_state)
        if add.save_state is not None and self.engine.state_store is None:  # a 400 now, not an error output later
            raise EngineInputError("this server has no state folder (start it with --state-dir)", "name")
        if request_id in self._queues:
            raise EngineInputError(f"request id {request_id!r} is already running", "request_id")
        if not self.is_running:
            await self.start()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._submit(add)
        finished = False
        try:
            while True:
                item = await queue.get()
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._submit(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._submit(_Abort(request_id))

    def _submit(self, command: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _run_loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._stopping and not self._commands and not engine.has_unfinished():
                    self._cond.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            outputs: list[RequestOutput] = []
            for cmd in commands:
                outputs += self._apply(cmd)
            try:
                outputs += engine.step()
            except Exception as exc:  # a bug outside the model call: fail what is in flight, keep serving
                logger.exception("engine step crashed")
                outputs += engine.fail_all(exc)
            self._stats = engine.stats()
            self._deliver_threadsafe(outputs)

    def _apply(self, cmd: _Add | _Abort) -> list[RequestOutput]:
        engine = self.engine
        if isinstance(cmd, _Abort):
            engine.abort_request(cmd.request_id)
            return []
        try:
            engine.add_request(
                cmd.request_id,
                cmd.prompt_token_ids,
                cmd.params,
                fork_of=cmd.fork_of,
                initial_state=cmd.initial_state,
                save_state=cmd.save_state,
            )
        except Exception as exc:
            return [final_output(cmd.request_id, FinishReason.ERROR, f"{type(exc).__name__}: {exc}")]
        return []

    def _deliver_threadsafe(self, outputs: list[RequestOutput]) -> None:
        """From the engine thread: hand each output to its consumer's event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[RequestOutput]] = {}
        for out in outputs:
            entry = self._queues.get(out.request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append(out)
        for loop, outs in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, outs)
            except RuntimeError:  # that loop is closed: nobody is left to read these
                logger.debug("dropping %d outputs for a closed event loop", len(outs))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            entry = self._queues.get(out.request_id)
            if entry is not None:
                entry[1].put_nowait(out)
