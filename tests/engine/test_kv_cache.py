"""The paged KV cache's block manager: sizing, growth, all-or-nothing allocation, no leaks, and the
step metadata it builds driving the paged-attention kernels to the dense result."""

from __future__ import annotations

import random

import pytest
import torch

from rnnserve.config import ConfigError, KVCacheConfig
from rnnserve.engine.kv_cache import DEFAULT_KV_CACHE_MEMORY, PAD_BLOCK, KVCache
from rnnserve.kernels.paged_attention import causal_attention_naive, paged_attention_decode, paged_attention_prefill
from rnnserve.models.base import PAD_SLOT, KVSpec

SPECS = [KVSpec(2, 8, torch.float32), KVSpec(2, 8, torch.float32)]
BYTES_PER_BLOCK = 16 * 2 * (2 * 2 * 8 * 4)  # block_size x layers x (k, v) x Hkv x D x fp32


def _cache(blocks: int | None = 10, num_slots: int = 5, max_model_len: int | None = 64, block_size: int = 16):
    memory = None if blocks is None else blocks * block_size * 2 * (2 * 2 * 8 * 4)
    return KVCache(SPECS, KVCacheConfig(kv_cache_memory=memory, block_size=block_size), num_slots, max_model_len, "cpu")


def test_sizing() -> None:
    cache = _cache(blocks=10)
    assert cache.bytes_per_block == BYTES_PER_BLOCK
    assert cache.num_blocks == 10 and cache.num_free_blocks == 10
    assert cache.caches[0][0].shape == (11, 16, 2, 8)  # + the padding block
    assert cache.max_blocks_per_seq == 4  # 64 tokens
    # Without a budget: every real slot at max_model_len, within the default memory.
    assert _cache(blocks=None, num_slots=5, max_model_len=40).num_blocks == 4 * 3
    for slots, max_len in ((5, None), (65, 1 << 20)):  # the meta device has no free memory to read: 4 GiB
        big = KVCache(SPECS, KVCacheConfig(), slots, max_len, "meta")
        assert big.num_blocks == DEFAULT_KV_CACHE_MEMORY // BYTES_PER_BLOCK
    with pytest.raises(ConfigError, match="holds no block"):
        KVCache(SPECS, KVCacheConfig(kv_cache_memory=BYTES_PER_BLOCK - 1), 5, 64, "cpu")
    with pytest.raises(ConfigError):
        KVCacheConfig(block_size=0)
    with pytest.raises(ConfigError):
        KVCacheConfig(kv_cache_memory=0)


def test_blocks_grow_with_the_sequence() -> None:
    cache = _cache()
    assert cache.allocate(3, 1) and cache.num_blocks_of(3) == 1
    assert cache.allocate(3, 16) and cache.num_blocks_of(3) == 1
    assert cache.allocate(3, 17) and cache.num_blocks_of(3) == 2
    assert cache.allocate(3, 5) and cache.num_blocks_of(3) == 2  # never shrinks
    assert cache.block_table(3) == [1, 2]
    assert cache.block_tables[3, :3].tolist() == [1, 2, PAD_BLOCK]
    assert cache.usage == pytest.approx(0.2)


def test_allocation_is_all_or_nothing() -> None:
    cache = _cache(blocks=3)
    assert cache.allocate(1, 32)
    assert not cache.can_allocate(2, 33)
    assert not cache.allocate(2, 33)  # needs 3, 1 free
    assert cache.num_blocks_of(2) == 0 and cache.num_free_blocks == 1
    assert cache.allocate(2, 16) and cache.num_free_blocks == 0


def test_limits_are_errors() -> None:
    cache = _cache()
    with pytest.raises(ValueError, match="padding slot"):
        cache.allocate(PAD_SLOT, 1)
    with pytest.raises(ValueError, match="exceed"):
        cache.allocate(1, 65)


def test_no_leaks_under_random_alloc_and_free() -> None:
    rng = random.Random(0)
    cache = _cache(blocks=12, num_slots=6)
    lengths = {s: 0 for s in range(1, 6)}
    for _ in range(400):
        slot = rng.randrange(1, 6)
        if rng.random() < 0.25:
            assert cache.free(slot) == cache.blocks_for(lengths[slot])
            lengths[slot] = 0
        else:
            n = min(64, lengths[slot] + rng.randrange(1, 20))
            if cache.allocate(slot, n):
                lengths[slot] = n
        owned = [b for s in range(1, 6) for b in cache.block_table(s)]
        assert len(owned) == len(set(owned)) == cache.num_used_blocks
        assert cache.num_used_blocks + cache.num_free_blocks == cache.num_blocks
        assert PAD_BLOCK not in owned
        for s in range(1, 6):
            row = cache.block_tables[s].tolist()
            assert row[: cache.num_blocks_of(s)] == cache.block_table(s)
            assert set(row[cache.num_blocks_of(s) :]) <= {PAD_BLOCK}
    for s in range(1, 6):
        cache.free(s)
    assert cache.num_free_blocks == cache.num_blocks and cache.usage == 0.0
    assert cache.block_tables.eq(PAD_BLOCK).all()


def test_metadata_drives_the_kernels_to_the_dense_result() -> None:
    """Two sequences prefilled in chunks (one crossing block boundaries) and decoded, blocks
    interleaved between them, through ``metadata``: the dense causal attention of each."""
    cache = _cache(blocks=20, num_slots=4, max_model_len=128, block_size=4)
    k_cache, v_cache = cache.caches[0]
    g = torch.Generator().manual_seed(0)
    lens = {1: 23, 3: 9}
    full = {s: [torch.randn(n, heads, 8, generator=g) for heads in (4, 2, 2)] for s, n in lens.items()}
    done = {1: 0, 3: 0}
    outs: dict[int, list[torch.Tensor]] = {1: [], 3: []}
    for chunk in (5, 3, 1, 7, 1, 1, 10):
        live = [s for s in lens if done[s] < lens[s]]
        q_lens = [min(chunk, lens[s] - done[s]) for s in live]
        seq_lens = [done[s] + n for s, n in zip(live, q_lens)]
        for s, n in zip(live, seq_lens):
            assert cache.allocate(s, n)
        meta = cache.metadata(live, seq_lens, q_lens)
        q, k, v = (torch.cat([full[s][i][done[s] : done[s] + n] for s, n in zip(live, q_lens)]) for i in range(3))
        if chunk == 1:
            o = paged_attention_decode(
                q, k, v, k_cache, v_cache, meta.seq_lens, meta.block_tables, meta.slot_mapping, 0.3, meta.max_seq_len
            )
        else:
            cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
            o = paged_attention_prefill(
                q,
                k,
                v,
                k_cache,
                v_cache,
                cu,
                meta.seq_lens,
                meta.block_tables,
                meta.slot_mapping,
                0.3,
                max(q_lens),
                meta.max_seq_len,
            )
        row = 0
        for s, n in zip(live, q_lens):
            outs[s].append(o[row : row + n])
            row += n
            done[s] += n
    assert set(cache.block_table(1)) & set(cache.block_table(3)) == set()
    for s in lens:
        q, k, v = full[s]
        torch.testing.assert_close(torch.cat(outs[s]), causal_attention_naive(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


def test_default_size_is_bounded_by_half_the_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --kv-cache-memory: every slot at max_model_len while that fits in half the memory
    available now, else that half (the sequences then share the blocks, preemption arbitrates)."""
    import rnnserve.engine.kv_cache as kv_cache

    free = kv_cache.available_memory(torch.device("cpu"))
    assert free is None or free > 0
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 40 * BYTES_PER_BLOCK)
    assert _cache(blocks=None, num_slots=5, max_model_len=64).num_blocks == 4 * 4  # 16 blocks fit in 20
    tight = _cache(blocks=None, num_slots=9, max_model_len=64)
    assert tight.num_blocks == 20 and tight.max_blocks_per_seq == 4
    assert _cache(blocks=None, num_slots=9, max_model_len=None).num_blocks == 20
