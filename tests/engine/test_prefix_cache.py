"""The prefix state cache with the fake model: hits give exactly the cold run's tokens and logprobs
(the fake model is fp32 and per-token, so to 1e-5), at the end of a previous answer, mid-prompt and
after a restart from the cache folder; the radix tree, tier budgets and LRU; concurrency, aborts and
n > 1 by fork."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from rnnserve.config import PrefixCacheConfig, RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import EngineInputError, LLMEngine, RequestOutput, SamplingParams
from rnnserve.engine.prefix_cache import PrefixCache, state_identity
from rnnserve.engine.state_pool import StatePool
from rnnserve.models.base import RecurrentLM, StateSpec
from tests.engine.fake_model import FakeRecurrentLM
from tests.engine.test_engine import drain, tokens

VOCAB = 97
ATOL = 1e-5


def make_engine(
    model: RecurrentLM,
    cache: PrefixCacheConfig | None,
    budget: int = 4096,
    slots: int = 8,
    state_dir: str | None = None,
) -> LLMEngine:
    return LLMEngine(
        model,
        StatePoolConfig(max_num_seqs=slots),
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=slots),
        RunnerConfig(),
        eos_token_id=None,
        prefix_cache_config=cache,
        state_dir=state_dir,
    )


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=3)


def run(engine: LLMEngine, prompt: list[int], params: SamplingParams, rid: str = "r") -> list[RequestOutput]:
    engine.add_request(rid, prompt, params)
    return drain(engine)[rid]


def assert_same(hit: list[RequestOutput], cold: list[RequestOutput]) -> None:
    """Same tokens, and the same logprobs (chosen and top-3) within ATOL."""
    assert tokens(hit) == tokens(cold)
    lp_hit = [lp for o in hit for lp in o.new_logprobs or []]
    lp_cold = [lp for o in cold for lp in o.new_logprobs or []]
    assert len(lp_hit) == len(lp_cold) > 0
    for a, b in zip(lp_hit, lp_cold):
        assert a.top.keys() == b.top.keys()
        assert a.logprob == pytest.approx(b.logprob, abs=ATOL)
        for k in a.top:
            assert a.top[k] == pytest.approx(b.top[k], abs=ATOL)


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def cold(model: RecurrentLM, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    return run(make_engine(model, None), prompt, params, "cold")


def test_next_turn_resumes_at_the_end_of_the_previous_answer():
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, PrefixCacheConfig(interval=1000))
    turn1 = prompt_of(30, 1)
    out1 = tokens(run(engine, turn1, greedy(), "t1"))
    # The last answer token was sampled but never fed: the cached prefix stops before it.
    assert engine.prefix_cache.prefixes() == sorted([turn1, turn1 + out1[:-1]])
    turn2 = turn1 + out1 + prompt_of(9, 2)
    hit = run(engine, turn2, greedy(), "t2")
    assert hit[-1].num_cached_tokens == len(turn1) + len(out1) - 1
    assert_same(hit, cold(model, turn2, greedy()))
    stats = engine.stats()
    assert stats.prefix_cache_queries == len(turn1) + len(turn2)
    assert stats.prefix_cache_hits == len(turn1) + len(out1) - 1
    # Only the uncached rest of turn 2 was prefilled.
    assert stats.prompt_tokens_total == len(turn1) + len(turn2) - stats.prefix_cache_hits


def test_mid_prompt_hit_from_interval_snapshots():
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, PrefixCacheConfig(interval=16), budget=40)
    long = prompt_of(100, 3)
    run(engine, long, greedy(1), "a")
    # Chunks that leave prompt for later end at interval multiples (budget 40: 32, 64), the last
    # chunk at the end of the prompt.
    assert sorted(len(k) for k in engine.prefix_cache.prefixes()) == [32, 64, 100]
    diverging = long[:70] + prompt_of(20, 4)
    hit = run(engine, diverging, greedy(), "b")
    assert hit[-1].num_cached_tokens == 64
    assert_same(hit, cold(model, diverging, greedy()))


def test_a_retokenised_history_hits_the_longest_equal_prefix():
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, PrefixCacheConfig(interval=8), budget=8)
    turn1 = prompt_of(20, 5)
    out1 = tokens(run(engine, turn1, greedy(), "t1"))
    # The client re-tokenised the answer differently from the ids the model generated.
    changed = [(t + 1) % VOCAB for t in out1]
    turn2 = turn1 + changed + prompt_of(5, 6)
    hit = run(engine, turn2, greedy(), "t2")
    assert hit[-1].num_cached_tokens == len(turn1)
    assert_same(hit, cold(model, turn2, greedy()))
    # A prompt equal to a cached prefix still runs its last token (to get logits).
    again = run(engine, turn1, greedy(), "t3")
    assert again[-1].num_cached_tokens == 16
    assert_same(again, cold(model, turn1, greedy()))


def test_hit_restores_fill_values_of_a_fresh_slot_when_nothing_matches():
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, PrefixCacheConfig(interval=4))
    run(engine, prompt_of(12, 7), greedy(), "a")
    other = prompt_of(12, 8)
    assert other[0] != prompt_of(12, 7)[0]
    miss = run(engine, other, greedy(), "b")
    assert miss[-1].num_cached_tokens == 0
    assert_same(miss, cold(model, other, greedy()))


def test_concurrent_requests_sharing_a_prefix():
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, PrefixCacheConfig(interval=8), budget=24, slots=4)
    system = prompt_of(40, 9)
    prompts = [system + prompt_of(5 + i, 10 + i) for i in range(6)]
    outs: dict[str, list[RequestOutput]] = {}
    for step in range(2000):
        if step < len(prompts):
            engine.add_request(f"r{step}", prompts[step], greedy())
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if step >= len(prompts) and not engine.has_unfinished():
            break
    assert engine.pool.num_used == 0
    for i, p in enumerate(prompts):
        assert_same(outs[f"r{i}"], cold(model, p, greedy()))
    # Later arrivals resumed from the system prompt's interval snapshots.
    assert outs["r5"][-1].num_cached_tokens >= 40 - 8


def test_abort_mid_prefill_leaves_the_tree_consistent():
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, PrefixCacheConfig(interval=8), budget=8)
    prompt = prompt_of(50, 11)
    engine.add_request("a", prompt, greedy())
    engine.step()
    engine.step()  # 16 tokens computed
    engine.abort_request("a")
    drain(engine)
    assert engine.pool.num_used == 0
    # Every cached key is a prefix the state really saw, nothing past what was computed.
    assert engine.prefix_cache.prefixes() == [prompt[:8], prompt[:16]]
    hit = run(engine, prompt, greedy(), "b")
    assert hit[-1].num_cached_tokens == 16
    assert_same(hit, cold(model, prompt, greedy()))


def test_no_cache_for_prompt_logprobs_and_when_disabled():
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, PrefixCacheConfig(enabled=False))
    assert engine.prefix_cache is None
    engine = make_engine(model, PrefixCacheConfig(interval=4))
    p = prompt_of(12, 12)
    run(engine, p, greedy(), "a")
    with_lps = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    out = run(engine, p, with_lps, "b")
    assert out[-1].num_cached_tokens == 0 and len(out[0].prompt_logprobs) == len(p)


def _specs() -> list[list[StateSpec]]:
    return [[StateSpec("h", (4,), torch.float32), StateSpec("pp", (2,), torch.float32, fill=-1e30)]]


def _cache(device_memory: int, host_memory: int, slots: int = 4) -> tuple[PrefixCache, StatePool]:
    pool = StatePool(_specs(), StatePoolConfig(max_num_seqs=slots), "cpu")
    model = FakeRecurrentLM(VOCAB)
    cfg = PrefixCacheConfig(device_memory=device_memory, host_memory=host_memory)
    return PrefixCache(pool, cfg, state_identity(model, pool)), pool


def test_radix_tree_split_prune_and_limit():
    cache, pool = _cache(10**6, 10**6)
    slot = pool.alloc()
    for key, value in [([1, 2, 3, 4], 1.0), ([1, 2], 2.0), ([1, 2, 5], 3.0), ([7], 4.0)]:
        pool.states[0]["h"][slot] = value
        cache.insert(key, slot)
    assert cache.prefixes() == [[1, 2], [1, 2, 3, 4], [1, 2, 5], [7]]
    dst = pool.alloc()
    assert cache.restore_longest([1, 2, 3, 4, 9], dst, limit=4) == 4
    assert pool.states[0]["h"][dst, 0] == 1.0
    assert cache.restore_longest([1, 2, 3, 4], dst, limit=3) == 2  # at least one token must run
    assert pool.states[0]["h"][dst, 0] == 2.0
    assert cache.restore_longest([1, 2, 3, 9], dst, limit=10) == 2  # diverges inside an edge
    assert cache.restore_longest([1, 3], dst, limit=10) == 0
    assert cache.longest_prefix([1, 2, 5, 6], limit=10) == 3
    assert cache.stats().queries == 5 + 4 + 4 + 2


def test_tiers_lru_and_eviction_under_a_tiny_budget():
    per = 6 * 4  # bytes per snapshot: h [4] + pp [2], fp32
    cache, pool = _cache(device_memory=2 * per, host_memory=2 * per)
    slot = pool.alloc()
    for i in range(5):
        pool.states[0]["h"][slot] = float(i)
        cache.insert([i, i], slot)
        s = cache.stats()
        assert s.device_bytes <= 2 * per and s.host_bytes <= 2 * per
    s = cache.stats()
    assert (s.device_entries, s.host_entries, s.evictions, s.spills) == (2, 2, 1, 3)
    assert cache.prefixes() == [[1, 1], [2, 2], [3, 3], [4, 4]]
    # A hit refreshes LRU order: [1, 1] survives the next insertion, [2, 2] does not.
    dst = pool.alloc()
    assert cache.restore_longest([1, 1, 0], dst, limit=2) == 2 and pool.states[0]["h"][dst, 0] == 1.0
    cache.insert([5, 5], slot)
    assert [1, 1] in cache.prefixes() and [2, 2] not in cache.prefixes()
    # A snapshot larger than both budgets is never stored.
    small, pool2 = _cache(device_memory=per - 1, host_memory=per - 1)
    assert not small.insert([1], pool2.alloc()) and len(small) == 0


def test_budgets_hold_in_the_engine_and_results_stay_exact():
    model = FakeRecurrentLM(VOCAB)
    per = model.hidden * 4 * 2 + 4 * 2  # h [16] + n [1] per layer, 2 layers, fp32
    engine = make_engine(model, PrefixCacheConfig(interval=8, device_memory=per * 2, host_memory=per * 3))
    for i in range(8):
        p = prompt_of(20, 100 + i)
        assert_same(run(engine, p, greedy(), f"r{i}"), cold(model, p, greedy()))
        s = engine.stats()
        assert s.prefix_cache_device_bytes <= per * 2 and s.prefix_cache_host_bytes <= per * 3
    assert engine.stats().prefix_cache_evictions > 0


def test_restart_from_the_cache_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    model = FakeRecurrentLM(VOCAB)
    cfg = PrefixCacheConfig(interval=1000, cache_dir=str(tmp_path / "cache"))
    turn1 = prompt_of(25, 13)
    first = make_engine(model, cfg)
    out1 = tokens(run(first, turn1, greedy(), "t1"))
    first.flush()  # the folder is written in the background
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 2 and (tmp_path / "cache" / "index.json").exists()
    # A corrupt file among ours is skipped with a warning.
    (tmp_path / "cache" / "broken.safetensors").write_bytes(b"not a safetensors file")
    restarted = make_engine(model, cfg)
    assert restarted.prefix_cache.prefixes() == sorted([turn1, turn1 + out1[:-1]])
    assert "skipping" in caplog.text and "broken.safetensors" in caplog.text
    turn2 = turn1 + out1 + prompt_of(4, 14)
    hit = run(restarted, turn2, greedy(), "t2")
    assert hit[-1].num_cached_tokens == len(turn1) + len(out1) - 1
    assert_same(hit, cold(model, turn2, greedy()))


def test_a_folder_of_another_model_is_not_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cfg = PrefixCacheConfig(interval=1000, cache_dir=str(tmp_path / "cache"))
    first = make_engine(FakeRecurrentLM(VOCAB, seed=0), cfg)
    run(first, prompt_of(10, 15), greedy(), "a")
    first.flush()
    caplog.set_level(logging.WARNING)
    other = make_engine(FakeRecurrentLM(VOCAB, seed=1), cfg)
    assert len(other.prefix_cache) == 0
    assert "another model" in caplog.text
    # A foreign file dropped into our folder is skipped too, and left where it is.
    own = tmp_path / "own"
    make_engine(FakeRecurrentLM(VOCAB, seed=1), PrefixCacheConfig(cache_dir=str(own)))
    for f in (tmp_path / "cache").glob("*.safetensors"):
        (own / f.name).write_bytes(f.read_bytes())
    caplog.clear()
    again = make_engine(FakeRecurrentLM(VOCAB, seed=1), PrefixCacheConfig(cache_dir=str(own)))
    assert len(again.prefix_cache) == 0 and "another model" in caplog.text
    assert len(list(own.glob("*.safetensors"))) == 2


def test_n_4_prefills_once_and_each_choice_equals_a_single_seeded_request():
    model = FakeRecurrentLM(VOCAB)
    prompt = prompt_of(30, 16)

    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=8, temperature=0.9, seed=seed, ignore_eos=True)

    engine = make_engine(model, PrefixCacheConfig(enabled=False), budget=8)
    engine.add_request("c-0", prompt, params(100))
    for i in range(1, 4):
        engine.add_request(f"c-{i}", prompt, params(100 + i), fork_of="c-0")
    outs = drain(engine)
    assert engine.stats().prompt_tokens_total == len(prompt)  # prefilled once
    assert engine.pool.num_used == 0
    choices = [tokens(outs[f"c-{i}"]) for i in range(4)]
    assert len({tuple(c) for c in choices}) > 1  # the choices differ
    for i in range(4):
        assert choices[i] == tokens(cold(model, prompt, params(100 + i)))
        assert outs[f"c-{i}"][-1].num_prompt_tokens == len(prompt)


def test_fork_falls_back_when_the_parent_goes_away_or_slots_run_out():
    model = FakeRecurrentLM(VOCAB)
    prompt = prompt_of(30, 17)
    engine = make_engine(model, None, budget=8, slots=2)
    engine.add_request("p", prompt, greedy())
    engine.add_request("c1", prompt, greedy(), fork_of="p")
    engine.add_request("c2", prompt, greedy(), fork_of="p")
    engine.step()
    engine.abort_request("p")  # before its prompt completes: the children prefill on their own
    outs = drain(engine)
    expected = tokens(cold(model, prompt, greedy()))
    assert tokens(outs["c1"]) == tokens(outs["c2"]) == expected
    assert engine.pool.num_used == 0
    # More children than free slots: the ones without a slot wait and prefill later.
    engine = make_engine(model, None, budget=64, slots=2)
    for i in range(4):
        engine.add_request(f"c{i}", prompt, greedy(), fork_of="c0" if i else None)
    outs = drain(engine)
    assert all(tokens(outs[f"c{i}"]) == expected for i in range(4))
    assert engine.pool.num_used == 0


def test_initial_state_and_save_state(tmp_path: Path):
    model = FakeRecurrentLM(VOCAB)
    engine = make_engine(model, PrefixCacheConfig(interval=4), state_dir=str(tmp_path / "states"))
    persona = prompt_of(15, 18)
    engine.add_request("save", persona, SamplingParams(max_tokens=1), save_state="persona")
    drain(engine)
    assert (tmp_path / "states" / "persona.safetensors").exists()
    question = prompt_of(6, 19)
    engine.add_request("q", question, greedy(), initial_state="persona")
    out = drain(engine)["q"]
    # Starting from the saved state equals running the persona prompt first.
    assert_same(out, cold(model, persona + question, greedy()))
    # Asked again from the same state, the question's prefix is a hit.
    engine.add_request("q2", [*question, 5], greedy(), initial_state="persona")
    assert drain(engine)["q2"][-1].num_cached_tokens == len(question)
    # Saved again under the same name from another prompt: the old state's cached prefixes are not used.
    other_persona = prompt_of(15, 21)
    engine.add_request("save2", other_persona, SamplingParams(max_tokens=1), save_state="persona")
    drain(engine)
    engine.add_request("q3", question, greedy(), initial_state="persona")
    out3 = drain(engine)["q3"]
    assert out3[-1].num_cached_tokens == 0
    assert_same(out3, cold(model, other_persona + question, greedy()))
    # The same question without the state is another prefix-cache tree: no hit from the state's run.
    plain = run(engine, question, greedy(), "plain")
    assert plain[-1].num_cached_tokens == 0
    assert_same(plain, cold(model, question, greedy()))
    with pytest.raises(EngineInputError, match="no state named"):
        engine.add_request("x", question, greedy(), initial_state="nope")
    other = make_engine(FakeRecurrentLM(VOCAB, seed=3), None, state_dir=str(tmp_path / "states"))
    with pytest.raises(EngineInputError, match="another model"):
        other.add_request("y", question, greedy(), initial_state="persona")


def test_engines_sharing_a_state_folder_see_each_others_saves(tmp_path: Path):
    """Ray Serve replicas share --state-dir: a state saved by one engine is loaded on demand by the
    other, again after it is saved anew, and is gone for both once its file is."""
    model = FakeRecurrentLM(VOCAB)
    folder = str(tmp_path / "states")
    a = make_engine(model, PrefixCacheConfig(interval=4), state_dir=folder)
    b = make_engine(model, PrefixCacheConfig(interval=4), state_dir=folder)
    question = prompt_of(6, 23)
    with pytest.raises(EngineInputError, match="no state named"):
        b.add_request("early", question, greedy(), initial_state="shared")
    for i, persona in enumerate((prompt_of(12, 24), prompt_of(12, 25))):
        a.add_request(f"save{i}", persona, SamplingParams(max_tokens=1), save_state="shared")
        drain(a)
        b.add_request(f"q{i}", question, greedy(), initial_state="shared")
        out = drain(b)[f"q{i}"]
        assert out[-1].num_cached_tokens == 0  # a new state: nothing of the old one's tree is used
        assert_same(out, cold(model, persona + question, greedy()))
    assert not list((tmp_path / "states").glob("*.tmp"))
    (tmp_path / "states" / "shared.safetensors").unlink()
    for engine in (a, b):
        with pytest.raises(EngineInputError, match="no state named"):
            engine.add_request("gone", question, greedy(), initial_state="shared")


def _prefilled_tokens(model: FakeRecurrentLM) -> int:
    return sum(tokens for kind, _, tokens in model.calls if kind == "prefill")


def test_equal_prefixes_in_flight_are_prefilled_once():
    """Requests sent together that share a prefix (n identical prompts without ``fork_of``, a burst
    with one system prompt) wait for the first one's snapshot at the end of the shared part instead
    of prefilling it again: counted in tokens fed to the model's prefill, not timed."""
    model = FakeRecurrentLM(VOCAB)
    prompt = prompt_of(40, 30)
    expected = cold(model, prompt, greedy())
    system = prompt_of(30, 31)
    burst = [system + prompt_of(5, 32 + i) for i in range(4)]
    expected_burst = [cold(model, p, greedy()) for p in burst]
    for prompts, shared, want in ((4 * [prompt], 39, 4 * [expected]), (burst, 30, expected_burst)):
        engine = make_engine(model, PrefixCacheConfig(interval=1000), budget=16)
        model.calls.clear()
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, greedy())
        outs = drain(engine)
        # The first prefilled its prompt; each other restored the shared part and ran the rest.
        assert _prefilled_tokens(model) == len(prompts[0]) + sum(len(p) - shared for p in prompts[1:])
        for i in range(len(prompts)):
            assert outs[f"r{i}"][-1].num_cached_tokens == (shared if i else 0)
            assert_same(outs[f"r{i}"], want[i])
        assert engine.pool.num_used == 0


def test_a_request_waiting_for_an_aborted_prefill_runs_on_its_own():
    model = FakeRecurrentLM(VOCAB)
    prompt = prompt_of(40, 40)
    engine = make_engine(model, PrefixCacheConfig(interval=1000), budget=8)
    for i in range(3):
        engine.add_request(f"r{i}", prompt, greedy())
    engine.step()
    # r1 and r2 waited for r0: r1 resumes from r0's 8 tokens (cached at its abort) and prefills the
    # rest, r2 waits for r1.
    engine.abort_request("r0")
    model.calls.clear()
    outs = drain(engine)
    assert _prefilled_tokens(model) == (40 - 8) + 1
    expected = cold(model, prompt, greedy())
    assert_same(outs["r1"], expected)
    assert_same(outs["r2"], expected)
    assert (outs["r1"][-1].num_cached_tokens, outs["r2"][-1].num_cached_tokens) == (8, 39)
    assert engine.pool.num_used == 0
