"""Writing new keys and values into the paged cache.

The cache of one attention layer is ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``. A token
at position p of a sequence with block table ``t`` lives in row ``t[p // block_size] * block_size +
p % block_size`` of the flattened ``[num_blocks * block_size, Hkv, D]`` view: its *slot mapping*,
computed once per step by the engine for every new token.
"""

from __future__ import annotations

import threading

import torch

# Host buffers ``gather_padded`` reuses, per thread (each engine loop runs in its own) and per
# (buffer name, dtype). A fresh [B, L, Hkv, D] tensor per layer and step is, past glibc's 32 MiB mmap
# threshold (4 sequences x 8k tokens x 256 channels in fp32), a new mapping whose page faults cost
# several times the copy itself. Grow-only: at most one layer's keys (values) of the largest batch.
_workspace = threading.local()


def _host_buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    if not hasattr(_workspace, "buffers"):
        _workspace.buffers = {}
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = _workspace.buffers
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        # A normal tensor even when first asked for under inference_mode (the engine's), so a later
        # caller outside it (no_grad) may still write into it.
        with torch.inference_mode(False):
            buf = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hkv, D] into the cache rows ``slot_mapping`` [T] int64, in place. No host sync, so a
    CUDA graph can hold it (padding rows map to the padding block)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_padded(
    cache: torch.Tensor, block_tables: torch.Tensor, length: int, reuse: str | None = None
) -> torch.Tensor:
    """[B, length, Hkv, D]: each sequence's first ``length`` cached positions, read through its block
    table in one indexing op (positions past a sequence's end hold whatever their block holds and
    must be masked). ``reuse`` names a host buffer the result is written into on the CPU (valid until
    the next call with that name in this thread): the attention kernels gather keys into "k" and
    values into "v" for each layer in turn."""
    batch, block_size = block_tables.shape[0], cache.shape[1]
    num_blocks = -(-length // block_size)
    index = block_tables[:, :num_blocks].reshape(-1)  # [B * nblk]
    # index_select over the flattened table: ~4x faster on the CPU than advanced indexing.
    if reuse is not None and cache.device.type == "cpu":
        out = _host_buffer(reuse, index.numel() * cache[0].numel(), cache.dtype).view(-1, *cache.shape[1:])
        gathered = torch.index_select(cache, 0, index, out=out)  # [B * nblk, bs, Hkv, D]
    else:
        gathered = cache.index_select(0, index)
    return gathered.view(batch, num_blocks * block_size, *cache.shape[2:])[:, :length]
