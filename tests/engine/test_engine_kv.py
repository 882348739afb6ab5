"""The engine with a paged KV cache (the Llama baseline and the Bamba hybrid): admission needs a
state slot and blocks, a sequence that runs out of blocks mid-decode preempts the youngest request
(recomputed later, same greedy tokens as an unconstrained run), and no block or slot leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from rnnserve.config import KVCacheConfig, ModelConfig, RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import EngineInputError, FinishReason, LLMEngine, RequestOutput, SamplingParams
from rnnserve.models.base import RecurrentLM
from rnnserve.models.loader import load_model
from tests.engine.test_engine import drain, tokens
from tests.models import harness

BLOCK = 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> RecurrentLM:
    from tests.conftest import build_random_hf_model

    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    folder = tmp_path_factory.mktemp("llama")
    build_random_hf_model(cfg, transformers.LlamaForCausalLM, jitter=0.05).save_pretrained(folder)
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu")).model


@pytest.fixture(scope="module")
def bamba(tmp_path_factory) -> RecurrentLM:
    from tests.conftest import build_random_hf_model
    from tests.models.test_bamba import _config

    folder = tmp_path_factory.mktemp("bamba")
    build_random_hf_model(_config(), transformers.BambaForCausalLM, jitter=0.05).save_pretrained(folder)
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu")).model


def make_engine(model: RecurrentLM, blocks: int | None, slots: int = 4, budget: int = 64) -> LLMEngine:
    per_block = BLOCK * sum(s.bytes_per_token for s in model.kv_specs())
    return LLMEngine(
        model,
        StatePoolConfig(max_num_seqs=slots),
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=slots, max_model_len=128),
        RunnerConfig(enforce_eager=True),
        eos_token_id=None,
        kv_cache_config=KVCacheConfig(kv_cache_memory=None if blocks is None else blocks * per_block, block_size=BLOCK),
    )


def _prompts(model: RecurrentLM, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, model.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, list[RequestOutput]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    outs = drain(engine)
    assert engine.kv_cache is not None and engine.kv_cache.num_used_blocks == 0
    assert engine.pool.num_used == 0
    return outs


@pytest.mark.parametrize("family", ["llama", "bamba"])
def test_preemption_gives_the_same_greedy_tokens(family: str, request) -> None:
    """Four sequences of up to 9 + 20 tokens (8 blocks each) in 12 blocks: decodes run out of blocks,
    the youngest requests are preempted and recomputed, and every request's tokens equal the
    unconstrained run's (and the model alone's)."""
    model = request.getfixturevalue(family)
    prompts = _prompts(model, [9, 5, 7, 3])
    free = _run(make_engine(model, blocks=None), prompts, 20)
    tight_engine = make_engine(model, blocks=12)
    tight = _run(tight_engine, prompts, 20)
    assert tight_engine.stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        assert tokens(tight[rid]) == tokens(free[rid]) == harness.greedy_generate(model, p, 20), rid
        assert [o.finished for o in tight[rid]].count(True) == 1 and tight[rid][-1].finish_reason is FinishReason.LENGTH


def test_admission_waits_for_blocks(llama) -> None:
    """A free slot is not enough: a prompt whose first block does not fit waits (no preemption for
    admission), and runs once blocks come back."""
    engine = make_engine(llama, blocks=3, slots=4)
    prompts = _prompts(llama, [10, 6])  # 3 blocks, then 2
    outs = _run(engine, prompts, 1)
    assert tokens(outs["r0"]) == harness.greedy_generate(llama, prompts[0], 1)
    assert tokens(outs["r1"]) == harness.greedy_generate(llama, prompts[1], 1)
    assert engine.stats().num_preemptions == 0


def test_no_block_or_slot_leaks_after_aborts(llama) -> None:
    engine = make_engine(llama, blocks=10, slots=3, budget=8)
    prompts = _prompts(llama, [20, 11, 4, 9, 13])
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    kv = engine.kv_cache
    assert kv is not None
    seen_usage = []
    for step in range(40):
        engine.step()
        s = engine.stats()
        seen_usage.append(s.kv_cache_blocks_used / s.kv_cache_blocks)
        if step == 1:
            engine.abort_request("r0")  # mid-prefill (20 tokens at 8 per step)
        if step == 6:
            engine.abort_request("r1")  # decoding
        if step == 9:
            engine.abort_request("r4")  # waiting or preempted
    assert max(seen_usage) > 0.5
    drain(engine)
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == kv.num_blocks
    assert engine.pool.num_used == 0
    assert kv.block_tables.eq(0).all()


def test_kv_limits(llama, tmp_path: Path) -> None:
    """The served context is bounded by what the cache can hold for one sequence: a longer prompt is
    a clear input error, a sequence stops with length there."""
    engine = make_engine(llama, blocks=5)  # 20 tokens
    assert engine.max_model_len == 20
    with pytest.raises(EngineInputError, match="max_model_len"):
        engine.add_request("long", list(range(21)), SamplingParams(max_tokens=1))
    outs = _run(engine, [list(range(15))], 50)
    assert len(tokens(outs["r0"])) == 5 and outs["r0"][-1].finish_reason is FinishReason.LENGTH


def test_pure_recurrent_models_have_no_kv_cache() -> None:
    from tests.engine.fake_model import FakeRecurrentLM

    engine = LLMEngine(
        FakeRecurrentLM(vocab_size=11), StatePoolConfig(), SchedulerConfig(), RunnerConfig(), eos_token_id=None
    )
    assert engine.kv_cache is None and engine.stats().kv_cache_blocks == 0


def test_named_states_are_off_for_kv_models(llama, tmp_path: Path) -> None:
    """Saved states hold the state pool only, which is not all of a KV model's memory: named states
    are a clear input error (the prefix cache also holds KV blocks: tests/engine/test_prefix_cache_kv.py)."""
    from rnnserve.config import PrefixCacheConfig

    engine = LLMEngine(
        llama,
        StatePoolConfig(max_num_seqs=2),
        SchedulerConfig(max_num_seqs=2),
        RunnerConfig(enforce_eager=True),
        eos_token_id=None,
        prefix_cache_config=PrefixCacheConfig(),
        state_dir=str(tmp_path),
    )
    assert engine.prefix_cache is not None and engine.prefix_cache.kv_cache is engine.kv_cache
    with pytest.raises(EngineInputError, match="KV cache"):
        engine.add_request("a", [1, 2], SamplingParams(max_tokens=1), initial_state="s")
    with pytest.raises(EngineInputError, match="KV cache"):
        engine.add_request("b", [1, 2], SamplingParams(max_tokens=1), save_state="s")


def test_metrics_report_the_kv_blocks(llama) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from rnnserve.server.metrics import ServerMetrics

    engine = make_engine(llama, blocks=6, slots=3)
    for i, p in enumerate(_prompts(llama, [9, 9, 9])):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for _ in range(6):
        engine.step()

    def samples() -> dict[str, float]:
        text = ServerMetrics("m", engine.stats).render().decode()
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}

    s = samples()
    assert s["rnnserve:kv_cache_blocks"] == 6
    assert s["vllm:kv_cache_usage_perc"] == s["rnnserve:kv_cache_blocks_used"] / 6 > 0
    assert s["rnnserve:kv_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 4  # layers x (k, v) x kv heads x dims x fp32
    assert s["rnnserve:state_pool_usage"] == engine.pool.usage
    drain(engine)
    s = samples()
    assert s["vllm:num_preemptions_total"] == engine.stats().num_preemptions > 0
    assert s["vllm:kv_cache_usage_perc"] == 0
