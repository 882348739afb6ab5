"""The paged KV cache of attention layers: fixed-size blocks, a block table per sequence.

Beside the state pool (fixed-size recurrent state per sequence), attention layers keep keys and
values per token. They live in one tensor pair per attention layer, ``[num_blocks + 1, block_size,
Hkv, D]``; a sequence owns a list of blocks (its block table) that grows as it does, and gives them
all back when it ends. Memory per sequence is therefore what it uses, not ``--max-model-len``.

Block tables are kept per state slot (a running request holds exactly one slot), in a host tensor
``[num_slots, max_blocks]`` whose row ``PAD_SLOT`` points only at ``PAD_BLOCK``, so CUDA-graph
padding rows write into the padding block. Every operation here is host bookkeeping; the only
device writes are the kernels' own.
"""

from __future__ import annotations

import heapq

import torch

from rnnserve.config import ConfigError, KVCacheConfig
from rnnserve.models.base import PAD_SLOT, KVCaches, KVSpec, PagedKVMetadata

# The padding block: padding rows of a CUDA-graph batch write their keys there, never into a real block.
PAD_BLOCK = 0
# Without --kv-cache-memory: every slot at max_model_len, but never more than this (a 256k-context
# hybrid would otherwise ask for hundreds of GiB); past it, sequences share the blocks and preemption
# arbitrates.
DEFAULT_KV_CACHE_MEMORY = 4 * 1024**3


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
            num_blocks = max(1, DEFAULT_KV_CACHE_MEMORY // self.bytes_per_block)
            if max_model_len is not None:
                # Every real slot at full length (what a per-slot cache would hold), within the default.
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
        self._num_used = 0

    @property
    def caches(self) -> KVCaches:
        """Per attention layer, (k_cache, v_cache) ``[num_blocks + 1, block_size, Hkv, D]``."""
        return self._caches

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self._num_used

    @property
    def usage(self) -> float:
        """Used real blocks / real blocks, in [0, 1]."""
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
        return self.blocks_needed(slot, num_tokens) <= len(self._free)

    def allocate(self, slot: int, num_tokens: int) -> bool:
        """Grow ``slot``'s table to hold ``num_tokens`` tokens; all or nothing (False: not enough free
        blocks, nothing changed). Raises past ``max_tokens_per_seq`` (a caller's bug: the engine
        bounds sequences by max_model_len)."""
        if slot == PAD_SLOT:
            raise ValueError("the padding slot holds no KV blocks")
        if num_tokens > self.max_tokens_per_seq:
            raise ValueError(f"{num_tokens} tokens exceed the KV cache's {self.max_tokens_per_seq} per sequence")
        need = self.blocks_needed(slot, num_tokens)
        if need > len(self._free):
            return False
        if need:
            table = self._tables.setdefault(slot, [])
            for _ in range(need):
                block = heapq.heappop(self._free)
                self.block_tables[slot, len(table)] = block
                table.append(block)
            self._num_used += need
        return True

    def free(self, slot: int) -> int:
        """Give back every block of ``slot`` (a slot without blocks is fine); the number freed."""
        table = self._tables.pop(slot, [])
        for block in table:
            heapq.heappush(self._free, block)
        self._num_used -= len(table)
        self.block_tables[slot, : len(table)] = PAD_BLOCK
        return len(table)

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
