"""The paged KV cache of attention layers: fixed-size blocks, a block table per sequence.

Beside the state pool (fixed-size recurrent state per sequence), attention layers keep keys and
values per token. They live in one tensor pair per attention layer, ``[num_blocks + 1, block_size,
Hkv, D]``; a sequence owns a list of blocks (its block table) that grows as it does, and gives them
all back when it ends. Memory per sequence is therefore what it uses, not ``--max-model-len``.

Block tables are kept per state slot (a running request holds exactly one slot), in a host tensor
``[num_slots, max_blocks]`` whose row ``PAD_SLOT`` points only at ``PAD_BLOCK``, so CUDA-graph
padding rows write into the padding block. Every operation here is host bookkeeping; the only
device writes are the kernels' own and the one-block copy of ``share``.

Blocks are reference-counted, as vLLM's block pool does for prefix caching: a block is held by the
tables that contain it and by the prefix-cache entries that ``retain`` it, and goes back to the free
list when neither holds it. A table only ever writes at positions past the tokens it shares:
``share`` (a prefix-cache hit, an ``n > 1`` fork) gives a slot the full blocks of a prefix by
reference and a private copy of its partial last block, so whoever still appends to that block
(the request that computed it) and the new sequence never write into each other's rows. Blocks held
only by the prefix cache are reclaimable: when ``allocate`` or ``share`` finds too few free blocks it
first asks ``reclaim`` (the prefix cache's LRU eviction) for them, and only then fails, which makes
the scheduler preempt a running request.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch

from rnnserve.config import ConfigError, KVCacheConfig
from rnnserve.models.base import PAD_SLOT, KVCaches, KVSpec, PagedKVMetadata

# The padding block: padding rows of a CUDA-graph batch write their keys there, never into a real block.
PAD_BLOCK = 0
# Without --kv-cache-memory: every slot at max_model_len, within this share of the memory available
# when the cache is made (a 256k-context hybrid would otherwise ask for hundreds of GiB), as vLLM's
# gpu_memory_utilization bounds its cache; past it, sequences share the blocks and preemption arbitrates.
DEFAULT_KV_CACHE_FRACTION = 0.5
# The bound instead where the available memory cannot be read (the meta device, no /proc/meminfo).
DEFAULT_KV_CACHE_MEMORY = 4 * 1024**3


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` now: the GPU's free memory on CUDA, the host's
    MemAvailable on the CPU; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def default_kv_cache_memory(device: torch.device) -> int:
    """The KV cache's bound without ``--kv-cache-memory``: half the memory available now."""
    free = available_memory(device)
    return DEFAULT_KV_CACHE_MEMORY if free is None else int(free * DEFAULT_KV_CACHE_FRACTION)


class KVCache:
    """Blocks of keys and values for every attention layer, handed out to state slots."""

    def __init__(
        self,
        specs: list[KVSpec],
        config: KVCacheConfig,
        num_slots: int,
        max_model_len: int | None,
        device: torch.device | str,
    ) -> None:
        if not specs:
            raise ValueError("a KV cache needs at least one attention layer")
        self.specs = specs
        self.block_size = config.block_size
        self.device = torch.device(device)
        self.bytes_per_block = config.block_size * sum(s.bytes_per_token for s in specs)
        if config.kv_cache_memory is not None:
            num_blocks = config.kv_cache_memory // self.bytes_per_block
            if num_blocks < 1:
                raise ConfigError(
                    f"kv_cache_memory={config.kv_cache_memory} bytes holds no block: one block of "
                    f"{config.block_size} tokens needs {self.bytes_per_block} bytes"
                )
        else:
            num_blocks = max(1, default_kv_cache_memory(self.device) // self.bytes_per_block)
            if max_model_len is not None:
                # Every real slot at full length (what a per-slot cache would hold), within the bound.
                num_blocks = min(num_blocks, (num_slots - 1) * cdiv(max_model_len, config.block_size))
        self.num_blocks = num_blocks  # real blocks: 1..num_blocks
        # Longest table: max_model_len positions, and never more blocks than exist.
        self.max_blocks_per_seq = min(
            num_blocks, cdiv(max_model_len, config.block_size) if max_model_len else num_blocks
        )
        self.max_tokens_per_seq = self.max_blocks_per_seq * config.block_size
        with torch.no_grad():
            self._caches: KVCaches = [
                tuple(
                    torch.zeros(
                        num_blocks + 1, config.block_size, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=device
                    )
                    for _ in range(2)
                )
                for s in specs
            ]  # type: ignore[misc]
        # [num_slots, max_blocks] int32 on the host; unused entries (and the padding slot's row) = PAD_BLOCK.
        self.block_tables = torch.full((num_slots, self.max_blocks_per_seq), PAD_BLOCK, dtype=torch.int32)
        self._tables: dict[int, list[int]] = {}
        self._free: list[int] = list(range(1, num_blocks + 1))  # min-heap: lowest block first
        # Per block (index 0, the padding block, unused): the tables holding it, the cache entries holding it.
        self._table_refs = [0] * (num_blocks + 1)
        self._cache_refs = [0] * (num_blocks + 1)
        self._num_used = 0  # blocks in at least one table
        self._num_cached = 0  # blocks held by the prefix cache only (reclaimable)
        # Frees at least the given number of blocks held only by the prefix cache if it can (set by it).
        self.reclaim: Callable[[int], None] | None = None

    @property
    def caches(self) -> KVCaches:
        """Per attention layer, (k_cache, v_cache) ``[num_blocks + 1, block_size, Hkv, D]``."""
        return self._caches

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks in some sequence's table."""
        return self._num_used

    @property
    def num_cached_blocks(self) -> int:
        """Blocks held only by prefix-cache entries: they count against the budget, but ``allocate``
        reclaims them before it fails."""
        return self._num_cached

    @property
    def num_available_blocks(self) -> int:
        """Blocks ``allocate`` can hand out: the free ones and, with a reclaimer, the cached-only ones."""
        return len(self._free) + (self._num_cached if self.reclaim is not None else 0)

    @property
    def usage(self) -> float:
        """Blocks held by sequences / real blocks, in [0, 1] (as vLLM reports it: blocks held only by the
        prefix cache are reclaimed on demand, so they do not count as used)."""
        return self._num_used / self.num_blocks

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block * (self.num_blocks + 1)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of ``num_tokens`` tokens occupies."""
        return cdiv(num_tokens, self.block_size)

    def num_blocks_of(self, slot: int) -> int:
        return len(self._tables.get(slot, ()))

    def blocks_needed(self, slot: int, num_tokens: int) -> int:
        """New blocks ``slot`` needs to hold ``num_tokens`` tokens in all."""
        return max(0, self.blocks_for(num_tokens) - self.num_blocks_of(slot))

    def can_allocate(self, slot: int, num_tokens: int) -> bool:
        return self.blocks_needed(slot, num_tokens) <= self.num_available_blocks

    def allocate(self, slot: int, num_tokens: int) -> bool:
        """Grow ``slot``'s table to hold ``num_tokens`` tokens; all or nothing (False: not enough free
        blocks, even after reclaiming cached ones; the table unchanged). Raises past
        ``max_tokens_per_seq`` (a caller's bug: the engine bounds sequences by max_model_len)."""
        if slot == PAD_SLOT:
            raise ValueError("the padding slot holds no KV blocks")
        if num_tokens > self.max_tokens_per_seq:
            raise ValueError(f"{num_tokens} tokens exceed the KV cache's {self.max_tokens_per_seq} per sequence")
        need = self.blocks_needed(slot, num_tokens)
        if not self._ensure_free(need):
            return False
        if need:
            table = self._tables.setdefault(slot, [])
            for _ in range(need):
                block = self._pop_free()
                self.block_tables[slot, len(table)] = block
                table.append(block)
        return True

    def free(self, slot: int) -> int:
        """Drop ``slot``'s hold on every block of its table (a slot without blocks is fine); the number
        of blocks it held. Blocks nobody else holds go back to the free list."""
        table = self._tables.pop(slot, [])
        for block in table:
            self._unref_table(block)
        self.block_tables[slot, : len(table)] = PAD_BLOCK
        return len(table)

    def share(self, slot: int, blocks: list[int], num_tokens: int) -> bool:
        """Give ``slot`` (which holds no blocks) the first ``num_tokens`` tokens of ``blocks``: the full
        blocks by reference, the partial last one (``num_tokens % block_size`` rows) as a private copy,
        since the slot appends into it. False, with nothing changed, when no block is left for the copy."""
        if slot == PAD_SLOT or self._tables.get(slot):
            raise ValueError(f"slot {slot} cannot share blocks: it is the padding slot or already holds blocks")
        if len(blocks) != self.blocks_for(num_tokens):
            raise ValueError(f"{len(blocks)} blocks do not hold exactly {num_tokens} tokens")
        if not blocks:
            return True
        table = list(blocks)
        for block in table:
            self._ref_table(block)  # held from here: reclaiming below cannot free them
        self._tables[slot] = table
        self.block_tables[slot, : len(table)] = torch.tensor(table, dtype=torch.int32)
        if num_tokens % self.block_size:
            if not self._ensure_free(1):
                self.free(slot)
                return False
            src, dst = table[-1], self._pop_free()
            with torch.no_grad():
                for k_cache, v_cache in self._caches:  # [num_blocks + 1, block_size, Hkv, D]
                    k_cache[dst].copy_(k_cache[src])
                    v_cache[dst].copy_(v_cache[src])
            table[-1] = dst
            self.block_tables[slot, len(table) - 1] = dst
            self._unref_table(src)
        return True

    def fork(self, src_slot: int, dst_slot: int, num_tokens: int) -> bool:
        """``share`` the first ``num_tokens`` tokens of ``src_slot``'s blocks with ``dst_slot`` (n > 1)."""
        return self.share(dst_slot, self.block_table(src_slot)[: self.blocks_for(num_tokens)], num_tokens)

    def retain(self, blocks: list[int]) -> None:
        """A prefix-cache entry takes a hold on ``blocks`` (each in some table or already cached)."""
        for block in blocks:
            if self._table_refs[block] == 0 and self._cache_refs[block] == 0:
                raise ValueError(f"block {block} is free: there is nothing in it to cache")
            self._cache_refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """A prefix-cache entry drops its hold on ``blocks``; those nobody holds are free again."""
        for block in blocks:
            self._cache_refs[block] -= 1
            if self._cache_refs[block] == 0 and self._table_refs[block] == 0:
                self._num_cached -= 1
                heapq.heappush(self._free, block)

    def load_block(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> int | None:
        """A free block filled with saved keys and values (per attention layer, ``[r, Hkv, D]`` each,
        ``r <= block_size`` rows from the top) and held by the caller as a cache entry holds one
        (``release`` it when done); None when no block is free. For a restarted prefix cache."""
        if not self._free:
            return None
        block = heapq.heappop(self._free)
        self._cache_refs[block] = 1
        self._num_cached += 1
        with torch.no_grad():
            for (k_cache, v_cache), (k, v) in zip(self._caches, rows):  # [num_blocks + 1, block_size, Hkv, D]
                k_cache[block, : k.shape[0]].copy_(k)
                v_cache[block, : v.shape[0]].copy_(v)
        return block

    def block_rows(self, block: int, num_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``num_rows`` keys and values of ``block`` per attention layer, ``[num_rows, Hkv, D]``
        each, copied to the host (to save them)."""
        return [
            (k[block, :num_rows].to("cpu", copy=True), v[block, :num_rows].to("cpu", copy=True))
            for k, v in self._caches
        ]

    def frees_on_release(self, blocks: list[int]) -> int:
        """How many of ``blocks`` one entry's ``release`` would free now."""
        return sum(1 for b in blocks if self._cache_refs[b] == 1 and self._table_refs[b] == 0)

    def _ensure_free(self, need: int) -> bool:
        if need > len(self._free) and self.reclaim is not None:
            self.reclaim(need - len(self._free))
        return need <= len(self._free)

    def _pop_free(self) -> int:
        block = heapq.heappop(self._free)
        self._table_refs[block] = 1
        self._num_used += 1
        return block

    def _ref_table(self, block: int) -> None:
        if self._table_refs[block] == 0:
            if self._cache_refs[block] == 0:
                raise ValueError(f"block {block} is free: there is nothing in it to share")
            self._num_cached -= 1
            self._num_used += 1
        self._table_refs[block] += 1

    def _unref_table(self, block: int) -> None:
        self._table_refs[block] -= 1
        if self._table_refs[block] == 0:
            self._num_used -= 1
            if self._cache_refs[block]:
                self._num_cached += 1
            else:
                heapq.heappush(self._free, block)

    def block_table(self, slot: int) -> list[int]:
        return list(self._tables.get(slot, ()))

    def metadata(self, slot_ids: list[int], seq_lens: list[int], query_lens: list[int]) -> PagedKVMetadata:
        """The step's ``PagedKVMetadata`` on the cache's device: sequence b (in ``slot_ids[b]``) holds
        ``seq_lens[b]`` tokens after this step, the last ``query_lens[b]`` of them new (1 in decode).
        Its blocks must already be allocated."""
        slots = torch.tensor(slot_ids, dtype=torch.long)  # [B]
        lens = torch.tensor(seq_lens, dtype=torch.long)
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        starts = torch.cumsum(q_lens, 0) - q_lens  # [B] first new token's row
        token_seq = torch.repeat_interleave(torch.arange(len(slot_ids)), q_lens)  # [T]
        pos = (lens - q_lens)[token_seq] + torch.arange(int(q_lens.sum())) - starts[token_seq]  # [T] absolute
        blocks = self.block_tables[slots[token_seq], pos // self.block_size].long()
        dev = self.device
        return PagedKVMetadata(
            caches=self._caches,
            block_tables=self.block_tables[slots].to(dev),
            seq_lens=lens.to(dev, torch.int32),
            slot_mapping=(blocks * self.block_size + pos % self.block_size).to(dev),
            max_seq_len=max(seq_lens, default=0),
            max_query_len=max(query_lens, default=0),
        )
