"""The prefix cache for models with a paged KV cache (the Llama baseline and the Bamba hybrid): an
entry holds the state snapshot at token t and references to the KV blocks of tokens [0, t); a hit
shares the full blocks and copies the partial last one. Hits at any token (not only block edges),
mid-prompt hits, a hit taken while the request that computed the prefix still appends into its
partial block, and n > 1 forks all give the greedy tokens of the cache-off engine and its logprobs
within 1e-4 (fp32; the chunks start at other positions, so sums differ in rounding only). Cached
blocks count against the KV budget and are reclaimed before any running request is preempted; no
block or slot leaks after aborts. With a cache folder, full blocks are files of their own, written
once, loaded back by a restarted engine and deleted with the last entry naming them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from rnnserve.config import KVCacheConfig, PrefixCacheConfig, RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import LLMEngine, RequestOutput, SamplingParams
from rnnserve.engine.kv_cache import KVCache
from rnnserve.models.base import RecurrentLM
from tests.engine.test_engine import drain, tokens
from tests.engine.test_engine_kv import bamba, llama  # noqa: F401 (module fixtures: the two models)

BLOCK = 4
INTERVAL = 8
ATOL = 1e-4


def make_engine(
    model: RecurrentLM,
    cache: bool,
    blocks: int | None = None,
    slots: int = 4,
    budget: int = INTERVAL,
    cache_dir: Path | None = None,
) -> LLMEngine:
    per_block = BLOCK * sum(s.bytes_per_token for s in model.kv_specs())
    folder = None if cache_dir is None else str(cache_dir)
    return LLMEngine(
        model,
        StatePoolConfig(max_num_seqs=slots),
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=slots, max_model_len=128),
        RunnerConfig(enforce_eager=True),
        eos_token_id=None,
        prefix_cache_config=PrefixCacheConfig(interval=INTERVAL, cache_dir=folder) if cache else None,
        kv_cache_config=KVCacheConfig(kv_cache_memory=None if blocks is None else blocks * per_block, block_size=BLOCK),
    )


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=3)


def prompt_of(model: RecurrentLM, n: int, seed: int) -> list[int]:
    return torch.randint(2, model.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: LLMEngine, prompt: list[int], rid: str, params: SamplingParams | None = None) -> list[RequestOutput]:
    engine.add_request(rid, prompt, params or greedy())
    return drain(engine)[rid]


def cold(model: RecurrentLM, prompt: list[int], params: SamplingParams | None = None) -> list[RequestOutput]:
    return run(make_engine(model, cache=False), prompt, "cold", params)


def assert_same(hit: list[RequestOutput], ref: list[RequestOutput]) -> None:
    assert tokens(hit) == tokens(ref)
    lp_hit = [lp for o in hit for lp in o.new_logprobs or []]
    lp_ref = [lp for o in ref for lp in o.new_logprobs or []]
    assert len(lp_hit) == len(lp_ref) > 0
    for a, b in zip(lp_hit, lp_ref):
        assert a.logprob == pytest.approx(b.logprob, abs=ATOL)
        assert a.top.keys() == b.top.keys()


def samples(engine: LLMEngine) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    from rnnserve.server.metrics import ServerMetrics

    text = ServerMetrics("m", engine.stats).render().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def assert_blocks_accounted(engine: LLMEngine) -> None:
    """Every block is free, in a table or held by cache entries only; cache-only blocks are exactly
    those of the entries no table shares; evicting every entry frees every block (nothing leaked)."""
    kv, cache = engine.kv_cache, engine.prefix_cache
    assert kv is not None and cache is not None
    assert kv.num_free_blocks + kv.num_used_blocks + kv.num_cached_blocks == kv.num_blocks
    assert engine.stats().kv_cache_blocks_cached == kv.num_cached_blocks
    if not engine.scheduler.has_unfinished():
        assert kv.num_used_blocks == 0 and engine.pool.num_used == 0
        cache.reclaim_kv_blocks(kv.num_blocks)
        assert len(cache) == 0 and kv.num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("family", ["llama", "bamba"])
def test_hits_at_any_token_equal_the_cache_off_run(family: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(family)
    engine = make_engine(model, cache=True)
    turn1 = prompt_of(model, 13, 1)
    out1 = tokens(run(engine, turn1, "t1"))
    # The next turn resends turn 1 and its answer: cached up to the last answer token, 18 tokens,
    # which ends inside a block (18 % 4 = 2): its partial block is copied, the 4 full ones shared.
    turn2 = turn1 + out1 + prompt_of(model, 5, 2)
    hit = run(engine, turn2, "t2")
    assert hit[-1].num_cached_tokens == len(turn1) + len(out1) - 1 == 18
    assert_same(hit, cold(model, turn2))
    # Diverging at token 11: the interval snapshot at 8 (a block edge: nothing copied).
    diverging = turn1[:11] + prompt_of(model, 6, 3)
    mid = run(engine, diverging, "t3")
    assert mid[-1].num_cached_tokens == INTERVAL
    assert_same(mid, cold(model, diverging))
    s = engine.stats()
    assert s.prefix_cache_hits == 18 + INTERVAL
    assert s.prompt_tokens_total == len(turn1) + len(turn2) + len(diverging) - s.prefix_cache_hits
    assert_blocks_accounted(engine)


@pytest.mark.parametrize("family", ["llama", "bamba"])
def test_a_hit_while_its_writer_still_appends_and_n_3_forks(family: str, request: pytest.FixtureRequest) -> None:
    """B restores A's prompt (13 tokens: block 3 partial) while A decodes into that same block: B's
    copy and A's rows never mix. Then n = 3 forks of one prompt share its blocks, prefilled once."""
    model = request.getfixturevalue(family)
    engine = make_engine(model, cache=True, budget=64)
    a = prompt_of(model, 13, 4)
    b = a + prompt_of(model, 4, 5)
    engine.add_request("a", a, greedy(8))
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(2):  # A's prompt, then its first decode (position 13, inside block 3)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    engine.add_request("b", b, greedy(8))
    for rid, more in drain(engine).items():
        outs.setdefault(rid, []).extend(more)
    assert outs["b"][-1].num_cached_tokens == len(a)
    assert_same(outs["a"], cold(model, a, greedy(8)))
    assert_same(outs["b"], cold(model, b, greedy(8)))

    prompt = prompt_of(model, 10, 6)

    def seeded(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=6, temperature=0.9, seed=100 + i, ignore_eos=True)

    before = engine.stats().prompt_tokens_total
    engine.add_request("c-0", prompt, seeded(0))
    for i in (1, 2):
        engine.add_request(f"c-{i}", prompt, seeded(i), fork_of="c-0")
    forks = drain(engine)
    assert engine.stats().prompt_tokens_total - before == len(prompt)  # prefilled once
    for i in range(3):
        assert tokens(forks[f"c-{i}"]) == tokens(cold(model, prompt, seeded(i)))
    assert_blocks_accounted(engine)


def test_equal_prompts_in_flight_are_prefilled_once(bamba) -> None:  # noqa: F811
    """Three equal prompts sent together (no ``fork_of``): the first prefills, the others wait for its
    snapshot (state and blocks) at all but the last token, and run that token only."""
    engine = make_engine(bamba, cache=True, budget=8)
    prompt = prompt_of(bamba, 21, 7)
    for i in range(3):
        engine.add_request(f"r{i}", prompt, greedy())
    outs = drain(engine)
    assert engine.stats().prompt_tokens_total == len(prompt) + 2
    expected = cold(bamba, prompt)
    for i in range(3):
        assert outs[f"r{i}"][-1].num_cached_tokens == (len(prompt) - 1 if i else 0)
        assert_same(outs[f"r{i}"], expected)
    assert_blocks_accounted(engine)


def test_cached_blocks_are_reclaimed_before_any_preemption(bamba) -> None:  # noqa: F811
    """12 blocks of 4 tokens: after two conversations the cache holds blocks; two concurrent
    requests that need 12 blocks between them get them by evicting entries (LRU), never by
    preempting each other, and still equal the cache-off run."""
    engine = make_engine(bamba, cache=True, blocks=12, budget=16)
    kv = engine.kv_cache
    assert kv is not None
    for i in range(2):
        run(engine, prompt_of(bamba, 13, 10 + i), f"warm{i}")
    assert kv.num_cached_blocks > 0 and kv.num_used_blocks == 0
    # Usage counts the sequences' blocks only, as vLLM's does (cached blocks are reclaimed on demand).
    metrics = samples(engine)
    assert metrics["vllm:kv_cache_usage_perc"] == 0
    assert metrics["rnnserve:kv_cache_blocks_cached"] == kv.num_cached_blocks
    prompts = [prompt_of(bamba, 14, 20 + i) for i in range(2)]  # 14 + 10 = 24 tokens = 6 blocks each
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy(10))
    outs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        assert kv.num_free_blocks + kv.num_used_blocks + kv.num_cached_blocks == kv.num_blocks
    s = engine.stats()
    assert s.num_preemptions == 0 and s.prefix_cache_evictions > 0
    for i, p in enumerate(prompts):
        assert_same(outs[f"r{i}"], cold(bamba, p, greedy(10)))
    assert_blocks_accounted(engine)


def test_no_block_or_slot_leaks_after_aborts(llama) -> None:  # noqa: F811
    engine = make_engine(llama, cache=True, blocks=10, slots=3)
    shared = prompt_of(llama, 10, 30)
    run(engine, shared, "warm")
    prompts = [shared + prompt_of(llama, 9 + i, 31 + i) for i in range(4)]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy(20))
    for step in range(12):
        engine.step()
        if step == 0:
            engine.abort_request("r0")  # restored the shared prefix, mid-prefill
        if step == 4:
            engine.abort_request("r1")  # decoding
        if step == 6:
            engine.abort_request("r3")  # waiting, or preempted
    drain(engine)
    assert_blocks_accounted(engine)


def test_share_refcounts_and_copy_on_share() -> None:
    """The block pool alone: shared full blocks stay put until the last holder lets go, the partial
    block is copied (its rows equal, its number not), reclaiming is asked for before failing."""
    from rnnserve.models.base import KVSpec

    kv = KVCache([KVSpec(1, 2, torch.float32)], KVCacheConfig(kv_cache_memory=5 * 4 * 16, block_size=4), 4, 20, "cpu")
    assert kv.num_blocks == 5
    assert kv.allocate(1, 10)  # blocks 1, 2, 3 (3 partial: 2 rows)
    kv.caches[0][0][1:4] = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 1, 2)
    kv.retain(kv.block_table(1))
    assert kv.free(1) == 3 and kv.num_cached_blocks == 3 and kv.num_free_blocks == 2
    assert kv.share(2, [1, 2, 3], 10)
    assert kv.block_table(2)[:2] == [1, 2] and kv.block_table(2)[2] not in (1, 2, 3)
    assert torch.equal(kv.caches[0][0][kv.block_table(2)[2]], kv.caches[0][0][3])
    assert (kv.num_used_blocks, kv.num_cached_blocks, kv.num_free_blocks) == (3, 1, 1)  # block 3: cache only
    assert kv.share(3, [1, 2, 3], 9)  # the last free block for its copy
    assert (kv.num_used_blocks, kv.num_cached_blocks, kv.num_free_blocks) == (4, 1, 0)
    asked: list[int] = []
    kv.reclaim = asked.append  # a reclaimer that frees nothing
    assert kv.num_available_blocks == 1  # block 3, held by the cache only
    assert kv.allocate(3, 12) and not kv.allocate(3, 13) and asked == [1]
    assert not kv.share(1, [1, 2, 3], 10) and kv.num_blocks_of(1) == 0  # no block for the copy: unchanged
    assert (kv.num_used_blocks, kv.num_cached_blocks, kv.num_free_blocks) == (4, 1, 0)
    kv.release([1, 2, 3])
    assert kv.num_free_blocks == 1  # block 3; 1 and 2 are still in tables
    kv.free(2)
    kv.free(3)
    assert kv.num_free_blocks == 5 and kv.num_used_blocks == kv.num_cached_blocks == 0


def test_restart_from_the_cache_folder(bamba, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    folder = tmp_path / "cache"
    first = make_engine(bamba, cache=True, cache_dir=folder)
    turn1 = prompt_of(bamba, 13, 50)
    out1 = tokens(run(first, turn1, "t1"))
    first.flush()  # the folder is written in the background
    # Entries at 8 (interval), 13 (prompt) and 18 (answer); full blocks [0, 4), [4, 8), ... [12, 16): one
    # file each, however many entries hold them.
    assert sorted(len(k) for k in first.prefix_cache.prefixes()) == [8, 13, 18]
    block_files = sorted(folder.glob("kv-*.safetensors"))
    assert len(block_files) == 4
    turn2 = turn1 + out1 + prompt_of(bamba, 5, 51)
    expected = cold(bamba, turn2)
    restarted = make_engine(bamba, cache=True, cache_dir=folder)
    assert restarted.prefix_cache.prefixes() == first.prefix_cache.prefixes()
    hit = run(restarted, turn2, "t2")
    assert hit[-1].num_cached_tokens == 18
    assert_same(hit, expected)
    # A missing block file: the entries naming it are skipped with a warning (and left where they
    # are), the others load. Block [12, 16) ends the prefix turn1 + out1[:3]: the 3 entries of 18
    # tokens and more name it (18, and the restarted engine's 24 = turn 2's prompt and 29 = its answer).
    key = hashlib.sha256(json.dumps(["", (turn1 + out1)[:16]]).encode()).hexdigest()[:32]
    restarted.flush()
    (folder / f"kv-{key}.safetensors").unlink()
    caplog.clear()
    third = make_engine(bamba, cache=True, cache_dir=folder)
    assert caplog.text.count("skipping") == 3 and key in caplog.text
    assert third.prefix_cache.prefixes() == [turn1[:8], turn1]
    assert_blocks_accounted(third)  # evicts every entry: their files, and the block files, go with them
    third.flush()
    assert len(list(folder.glob("*.safetensors"))) == 3 and not list(folder.glob("kv-*"))
