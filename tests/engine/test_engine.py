"""LLMEngine with the fake model: continuous batching equals running alone, stops, prompt logprobs,
errors and aborts without slot leaks."""

from __future__ import annotations

import pytest
import torch

from rnnserve.config import RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import EngineInputError, FinishReason, LLMEngine, RequestOutput, SamplingParams
from rnnserve.models.base import RecurrentLM
from tests.engine.fake_model import FakeRecurrentLM
from tests.models.harness import alloc_states, greedy_generate, prefill_batch

VOCAB = 97


def make_engine(
    model: RecurrentLM, budget: int = 4096, slots: int = 8, eos: int | None = None, max_model_len: int | None = None
) -> LLMEngine:
    return LLMEngine(
        model,
        StatePoolConfig(max_num_seqs=slots),
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=slots, max_model_len=max_model_len),
        RunnerConfig(),
        eos_token_id=eos,
    )


def drain(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not finish")


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def run_alone(model: RecurrentLM, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = make_engine(model)
    engine.add_request("alone", prompt, params)
    return tokens(drain(engine)["alone"])


def run_staggered(
    model: RecurrentLM,
    prompts: list[list[int]],
    params: list[SamplingParams],
    arrivals: list[int],
    budget: int,
    slots: int,
) -> dict[str, list[int]]:
    """Requests arrive at the given step numbers into an engine with a small budget and few slots."""
    engine = make_engine(model, budget=budget, slots=slots)
    outs: dict[str, list[RequestOutput]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step:
                engine.add_request(f"r{i}", prompts[i], params[i])
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        step += 1
        assert step < 5000
    assert engine.pool.num_used == 0
    for rid, seq in outs.items():
        assert seq[-1].finished and not any(o.finished for o in seq[:-1]), rid
    return {rid: tokens(seq) for rid, seq in outs.items()}


def check_continuous_batching(model: RecurrentLM, lengths: list[int], gen: int, budget: int, slots: int) -> None:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.vocab_size, (n,), generator=g).tolist() for n in lengths]
    params = [
        SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(max_tokens=gen, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    arrivals = [0, 0, 1, 3, 4, 7, 8][: len(prompts)]
    together = run_staggered(model, prompts, params, arrivals, budget=budget, slots=slots)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        alone = run_alone(model, prompt, p)
        assert len(alone) == gen
        assert together[f"r{i}"] == alone, f"request {i} (prompt {len(prompt)}, seed {p.seed})"


def test_alone_matches_direct_greedy_decoding():
    model = FakeRecurrentLM(VOCAB)
    prompt = [5, 17, 3, 88, 1]
    assert run_alone(model, prompt, SamplingParams(max_tokens=12, temperature=0.0)) == greedy_generate(
        model, prompt, 12
    )


def test_continuous_batching_fake_model():
    check_continuous_batching(FakeRecurrentLM(VOCAB), [1, 37, 5, 120, 2, 64, 9], gen=10, budget=16, slots=3)


def test_stops_eos_stop_tokens_and_lengths():
    model = FakeRecurrentLM(VOCAB)
    prompt = [4, 8, 15]
    free = run_alone(model, prompt, SamplingParams(max_tokens=8, temperature=0.0))
    eos = free[3]
    first = free.index(eos)

    engine = make_engine(model, eos=eos)
    engine.add_request("eos", prompt, SamplingParams(max_tokens=8, temperature=0.0))
    engine.add_request("ignore", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    engine.add_request("stop", prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(free[1],)))
    engine.add_request("min", prompt, SamplingParams(max_tokens=8, temperature=0.0, min_tokens=first + 2))
    outs = drain(engine)
    assert tokens(outs["eos"]) == free[: first + 1] and outs["eos"][-1].finish_reason is FinishReason.STOP
    assert tokens(outs["ignore"]) == free and outs["ignore"][-1].finish_reason is FinishReason.LENGTH
    assert tokens(outs["stop"]) == free[: free.index(free[1]) + 1]
    assert outs["stop"][-1].finish_reason is FinishReason.STOP
    got_min = tokens(outs["min"])
    assert eos not in got_min[: first + 2] and got_min[:first] == free[:first]

    engine = make_engine(model, max_model_len=6)
    engine.add_request("len", prompt, SamplingParams(max_tokens=None, temperature=0.0))
    outs = drain(engine)["len"]
    assert tokens(outs) == free[:3] and outs[-1].finish_reason is FinishReason.LENGTH
    assert outs[-1].num_output_tokens == 3 and outs[-1].num_prompt_tokens == 3


def test_prompt_logprobs_across_chunks_and_logprobs():
    model = FakeRecurrentLM(VOCAB)
    prompt = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2, logprobs=1)
    engine = make_engine(model, budget=5)
    engine.add_request("p", prompt, params)
    outs = drain(engine)["p"]
    plps = outs[0].prompt_logprobs
    assert plps is not None and len(plps) == len(prompt) and plps[0] is None
    assert all(o.prompt_logprobs is None for o in outs[1:])
    # Reference: one forward over the whole prompt, every token's logits.
    states = alloc_states(model, 2)
    with torch.no_grad():
        ref = torch.log_softmax(model.prefill(prefill_batch([prompt], [1], [0], "cpu", all_logits=True), states), -1)
    for i in range(1, len(prompt)):
        entry = plps[i]
        assert entry is not None and entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        assert list(entry.top) == ref[i - 1].topk(2).indices.tolist()
    assert all(o.new_logprobs is not None and len(o.new_logprobs) == len(o.new_token_ids) for o in outs)
    assert outs[0].new_logprobs[0].logprob == pytest.approx(float(ref[-1].max()), abs=1e-4)


def test_step_error_finishes_requests_and_engine_keeps_serving():
    # A request alone in a failing step ends with ERROR (a shared step is retried request by request:
    # tests/engine/test_failure_isolation.py).
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, budget=64, slots=4)
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0))
    engine.step()
    model.fail_with = RuntimeError("boom")
    outs = engine.step()
    assert [o.request_id for o in outs] == ["a"]
    assert all(o.finished and o.finish_reason is FinishReason.ERROR and "boom" in (o.error or "") for o in outs)
    assert engine.pool.num_used == 0 and not engine.has_unfinished()
    # Failing in the middle of a chunked prefill leaks nothing either.
    engine2 = make_engine(model, budget=4, slots=2)
    engine2.add_request("long", list(range(1, 30)), SamplingParams(max_tokens=2))
    engine2.step()
    model.fail_with = ValueError("bad")
    assert engine2.step()[0].finish_reason is FinishReason.ERROR
    assert engine2.pool.num_used == 0
    # The first engine still serves, and correctly.
    engine.add_request("c", [7, 8, 9], SamplingParams(max_tokens=6, temperature=0.0))
    assert tokens(drain(engine)["c"]) == greedy_generate(model, [7, 8, 9], 6)


def test_abort_and_validation():
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, budget=4, slots=1, max_model_len=50)
    engine.add_request("run", [1, 2], SamplingParams(max_tokens=100))
    engine.add_request("pre", list(range(1, 40)), SamplingParams(max_tokens=100))
    engine.step()
    engine.step()
    engine.abort_request("run")  # frees the one slot: "pre" gets admitted and starts prefilling
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs if o.finished] == [("run", FinishReason.ABORT)]
    assert engine.pool.num_used == 1 and engine.scheduler.get("pre").is_prefilling
    engine.abort_request("pre")
    engine.abort_request("unknown")
    assert engine.step()[0].finish_reason is FinishReason.ABORT
    assert engine.pool.num_used == 0 and not engine.has_unfinished()
    stats = engine.stats()
    assert stats.num_slots == 1 and stats.slots_used == 0 and stats.state_pool_usage == 0.0
    assert stats.prompt_tokens_total > 0 and stats.generation_tokens_total > 0 and stats.num_steps > 0

    for bad, match in [([], "empty"), ([1, VOCAB], "vocabulary"), ([-1], "vocabulary"), ([1] * 51, "max_model_len")]:
        with pytest.raises(EngineInputError, match=match) as info:
            engine.add_request("bad", bad, SamplingParams())
        assert info.value.param == "prompt"
    engine.add_request("dup", [1], SamplingParams())
    with pytest.raises(EngineInputError, match="already"):
        engine.add_request("dup", [1], SamplingParams())


@pytest.mark.parametrize("trial", range(3))
def test_random_schedules_match_alone_and_leak_nothing(trial):
    """Random arrivals, budgets, prompt lengths, sampling modes, prompt logprobs and aborts."""
    rng = torch.Generator().manual_seed(trial)

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    model = FakeRecurrentLM(VOCAB, seed=trial)
    engine = make_engine(model, budget=rand(1, 24), slots=rand(1, 4))
    n = 8
    prompts = [torch.randint(0, VOCAB, (rand(1, 40),), generator=rng).tolist() for _ in range(n)]
    params = [
        SamplingParams(
            max_tokens=rand(1, 6),
            temperature=0.0 if i % 3 == 0 else 1.0,
            seed=None if i % 3 == 0 else 1000 + i,
            prompt_logprobs=1 if i % 2 else None,
            logprobs=2 if i % 4 == 1 else None,
            ignore_eos=True,
        )
        for i in range(n)
    ]
    arrivals = sorted(rand(0, 12) for _ in range(n))
    abort_at = {rand(0, n - 1): rand(1, 15)}
    outs: dict[str, list[RequestOutput]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step:
                engine.add_request(f"r{i}", prompts[i], params[i])
        for i, at in abort_at.items():
            if at == step:
                engine.abort_request(f"r{i}")
        for o in engine.step():
            assert o.error is None, o.error
            outs.setdefault(o.request_id, []).append(o)
        step += 1
        assert step < 1000
    assert engine.pool.num_used == 0
    for i in range(n):
        seq = outs[f"r{i}"]
        assert seq[-1].finished
        if seq[-1].finish_reason is FinishReason.ABORT:
            continue
        assert tokens(seq) == run_alone(model, prompts[i], params[i]), i
        if params[i].prompt_logprobs is not None:
            assert seq[0].prompt_logprobs is not None and len(seq[0].prompt_logprobs) == len(prompts[i])


@pytest.mark.parametrize("pack", [None, 4096])
def test_simultaneous_prompts_first_tokens_per_step_and_equal_to_alone(pack: int | None) -> None:
    """Five 80-token prompts added together: on a CPU by default each gets its first token one step
    after the previous one (a step of its own, with the earlier ones' decodes); packed up to the
    budget all get it at the first step. Either way each request's tokens are those it gets alone."""
    model = FakeRecurrentLM(VOCAB)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (80,), generator=g).tolist() for _ in range(5)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(
        model,
        StatePoolConfig(max_num_seqs=8),
        SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=8, prefill_pack_tokens=pack),
        RunnerConfig(),
        eos_token_id=None,
    )
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    first_step: dict[str, int] = {}
    outs: dict[str, list[RequestOutput]] = {}
    for step in range(1, 100):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
            if o.new_token_ids:
                first_step.setdefault(o.request_id, step)
    expected = [1, 2, 3, 4, 5] if pack is None else [1] * 5
    assert [first_step[f"r{i}"] for i in range(5)] == expected
    for i, prompt in enumerate(prompts):
        assert tokens(outs[f"r{i}"]) == run_alone(model, prompt, params)
