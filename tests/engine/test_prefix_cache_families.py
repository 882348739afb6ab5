"""Prefix-cache hits for every family (random checkpoints in their real layouts, the builders of the
end-to-end family tests): a hit at the end of a previous answer, one mid-prompt from an interval
snapshot, and both again from a restarted engine that loaded the cache folder, each give the greedy
tokens of a cold run of the same prompt and its logprobs within 1e-4 (fp32; the cold run's prefill
chunks start at other positions, so the sums differ in rounding only). RWKV-4's ``pp`` fill value
is covered by the same checks; the Llama baseline's entries hold its paged KV blocks (the answer's
end is not a block edge: its partial block is copied), and its restarted engine loads them from the
folder's block files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnserve.config import ModelConfig, PrefixCacheConfig, RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import LLMEngine, RequestOutput, SamplingParams
from rnnserve.models.base import RecurrentLM
from rnnserve.models.loader import load_model
from tests.e2e.test_families import FAMILIES
from tests.engine.test_engine import drain, tokens

ATOL = 1e-4
INTERVAL = 16


def make_engine(model: RecurrentLM, cache: PrefixCacheConfig | None) -> LLMEngine:
    return LLMEngine(
        model,
        StatePoolConfig(max_num_seqs=2),
        SchedulerConfig(max_num_batched_tokens=INTERVAL, max_num_seqs=2),
        RunnerConfig(enforce_eager=True),
        eos_token_id=None,
        prefix_cache_config=cache,
    )


def run(engine: LLMEngine, prompt: list[int], rid: str) -> list[RequestOutput]:
    engine.add_request(rid, prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3))
    return drain(engine)[rid]


def assert_same(hit: list[RequestOutput], cold: list[RequestOutput]) -> None:
    assert tokens(hit) == tokens(cold)
    lps_hit = [lp for o in hit for lp in o.new_logprobs or []]
    lps_cold = [lp for o in cold for lp in o.new_logprobs or []]
    assert len(lps_hit) == len(lps_cold) > 0
    for a, b in zip(lps_hit, lps_cold):
        assert a.logprob == pytest.approx(b.logprob, abs=ATOL)
        assert a.top.keys() == b.top.keys()
        assert list(a.top.values()) == pytest.approx(list(b.top.values()), abs=ATOL)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hits_equal_cold_runs(family: str, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    FAMILIES[family](folder)
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu")).model
    vocab = min(model.vocab_size, 90)
    g = torch.Generator().manual_seed(0)
    turn1 = torch.randint(2, vocab, (40,), generator=g).tolist()
    cache = PrefixCacheConfig(interval=INTERVAL, cache_dir=str(tmp_path / "cache"))
    first = make_engine(model, cache)
    answer = tokens(run(first, turn1, "t1"))
    turn2 = turn1 + answer + torch.randint(2, vocab, (7,), generator=g).tolist()
    diverging = turn1[:37] + torch.randint(2, vocab, (6,), generator=g).tolist()
    cold = make_engine(model, None)
    expected = {"turn2": run(cold, turn2, "c2"), "diverging": run(cold, diverging, "c3")}
    first.flush()  # the folder is written in the background
    restarted = make_engine(model, cache)  # a new engine over the folder the first one wrote
    for engine in (first, restarted):
        hit = run(engine, turn2, "t2")
        assert hit[-1].num_cached_tokens == len(turn1) + len(answer) - 1
        assert_same(hit, expected["turn2"])
        mid = run(engine, diverging, "t3")
        assert mid[-1].num_cached_tokens == 32  # the interval snapshot under the divergence at 37
        assert_same(mid, expected["diverging"])
        assert engine.pool.num_used == 0
