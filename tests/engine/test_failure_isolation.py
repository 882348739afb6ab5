"""One request the sampler or the model pass cannot take fails alone: the others in its step go on,
token for token as if it had never been there, and every slot comes back."""

from __future__ import annotations

import pytest
import torch

from rnnserve.config import RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import FinishReason, LLMEngine, RequestOutput, SamplingParams
from rnnserve.models.base import DecodeBatch, PrefillBatch, States
from tests.engine.fake_model import FakeRecurrentLM

VOCAB = 97
HEALTHY = [
    ("greedy", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0)),
    ("seeded", [8, 9], SamplingParams(max_tokens=6, temperature=0.8, seed=3)),
    ("top-k", [10, 11, 12, 13], SamplingParams(max_tokens=6, temperature=0.7, top_k=2**70, top_p=0.9, seed=4)),
]


def run(requests: list[tuple[str, list[int], SamplingParams]]) -> tuple[dict[str, list[RequestOutput]], LLMEngine]:
    engine = LLMEngine(
        FakeRecurrentLM(vocab_size=VOCAB, seed=1),
        StatePoolConfig(max_num_seqs=8),
        SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8),
        RunnerConfig(),
        eos_token_id=None,
    )
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(100):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert not engine.has_unfinished()
    return outs, engine


def test_a_seed_past_uint64_fails_only_its_own_request() -> None:
    # The server refuses such a seed (400); the engine must survive it anyway (a library caller).
    poison = ("poison", [1, 2], SamplingParams(max_tokens=6, temperature=1.0, seed=2**64))
    alone, _ = run(HEALTHY)
    for order in ([HEALTHY[0], poison, *HEALTHY[1:]], [*HEALTHY, poison]):
        mixed, engine = run(order)
        check_isolated(alone, mixed, engine)


def check_isolated(
    alone: dict[str, list[RequestOutput]], mixed: dict[str, list[RequestOutput]], engine: LLMEngine
) -> None:
    assert mixed["poison"][-1].finish_reason is FinishReason.ERROR and mixed["poison"][-1].error
    for request_id, _, _ in HEALTHY:
        got = [t for o in mixed[request_id] for t in o.new_token_ids]
        assert got == [t for o in alone[request_id] for t in o.new_token_ids]
        assert mixed[request_id][-1].finish_reason is FinishReason.LENGTH and mixed[request_id][-1].error is None
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.slots_used) == (0, 0, 0)


def test_a_tiny_temperature_samples_finite_logprobs() -> None:
    params = SamplingParams(max_tokens=4, temperature=1e-40, logprobs=3)
    outs, _ = run([("tiny", [3, 4], params)])
    entries = [lp for o in outs["tiny"] for lp in (o.new_logprobs or [])]
    assert len(entries) == 4
    for lp in entries:
        assert lp.logprob == lp.logprob and lp.logprob > float("-inf")  # not NaN, not -inf
        assert all(v == v for v in lp.top.values())


POISON = 50  # a token id the model pass fails on (a stand-in for a fault only one request's input triggers)


class PoisonTokenLM(FakeRecurrentLM):
    """Fails any pass whose input holds POISON, whoever else is in it; never generates POISON itself,
    so only a prompt can bring it in."""

    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        return self._checked(batch.input_ids, lambda: super(PoisonTokenLM, self).prefill(batch, states))

    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        return self._checked(batch.input_ids, lambda: super(PoisonTokenLM, self).decode(batch, states))

    def _checked(self, input_ids: torch.Tensor, run) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if bool((input_ids == POISON).any()):
            raise RuntimeError("injected model fault")
        logits = run()  # [B, V]
        logits[:, POISON] = float("-inf")
        return logits


def run_with_late_poison(budget: int, poison_after: int) -> tuple[dict[str, list[RequestOutput]], LLMEngine]:
    """HEALTHY from the start; a poisoned prompt joins after ``poison_after`` steps (-1: never)."""
    engine = LLMEngine(
        PoisonTokenLM(vocab_size=VOCAB, seed=1),
        StatePoolConfig(max_num_seqs=8),
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8),
        RunnerConfig(),
        eos_token_id=None,
    )
    for request_id, prompt, params in HEALTHY:
        engine.add_request(request_id, prompt, params)
    outs: dict[str, list[RequestOutput]] = {}
    for step in range(200):
        if step == poison_after:
            engine.add_request("poison", [3, 4, POISON, 5, 6], SamplingParams(max_tokens=6, temperature=0.0))
        if step > poison_after and not engine.has_unfinished():
            break
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert not engine.has_unfinished()
    return outs, engine


@pytest.mark.parametrize("budget", [256, 3])  # whole prompts in one step; chunks of a few tokens
@pytest.mark.parametrize("poison_after", [0, 2])  # in the first step's prefill; amid the others' decodes
def test_a_model_pass_failure_fails_only_the_request_that_causes_it(budget: int, poison_after: int) -> None:
    alone, _ = run_with_late_poison(budget, poison_after=-1)
    mixed, engine = run_with_late_poison(budget, poison_after)
    check_isolated(alone, mixed, engine)
    # Each request sent its tokens once: recomputing after the failed step re-sent nothing.
    for request_id, _, params in HEALTHY:
        assert sum(len(o.new_token_ids) for o in mixed[request_id]) == params.max_tokens


def test_a_failed_shared_step_that_passes_on_retry_fails_nobody() -> None:
    """A fault of the step, not of any request (it does not come back): everyone is recomputed and
    finishes as if nothing had happened."""
    alone, _ = run_with_late_poison(256, poison_after=-1)
    engine = LLMEngine(
        PoisonTokenLM(vocab_size=VOCAB, seed=1),
        StatePoolConfig(max_num_seqs=8),
        SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8),
        RunnerConfig(),
        eos_token_id=None,
    )
    for request_id, prompt, params in HEALTHY:
        engine.add_request(request_id, prompt, params)
    outs: dict[str, list[RequestOutput]] = {}
    for step in range(200):
        if not engine.has_unfinished():
            break
        if step == 3:
            engine.model.fail_with = RuntimeError("transient fault")  # type: ignore[assignment]
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    for request_id, _, _ in HEALTHY:
        assert [t for o in outs[request_id] for t in o.new_token_ids] == [
            t for o in alone[request_id] for t in o.new_token_ids
        ]
        assert outs[request_id][-1].finish_reason is FinishReason.LENGTH
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.slots_used) == (0, 0, 0)
