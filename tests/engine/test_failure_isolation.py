"""One request the sampler cannot take fails alone: the others in its step go on, token for token as
if it had never been there, and every slot comes back."""

from __future__ import annotations

from rnnserve.config import RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import FinishReason, LLMEngine, RequestOutput, SamplingParams
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
