"""Cutting a packed variable-length batch into fixed-size chunks, shared by the chunked prefills.

Every sequence is cut into chunks of L tokens that never cross a sequence boundary, and all chunks of
the batch are gathered into one ``[NC, L, ...]`` block (NC = total chunks), padded after each
sequence's last token. A chunked kernel then works on all chunks at once, and only the carry of the
state from one chunk of a sequence to the next is sequential: a loop over the chunk index, batched
over the sequences that still have a chunk there (``carry_steps``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkLayout:
    """Where every chunk's tokens live in the packed batch.

    gather:      [NC * L] int64, token index of each chunk position; padding points at index T (one
                 row appended to every input by ``to_chunks``).
    valid:       [NC] int64, number of real tokens in each chunk.
    first_chunk: per sequence, the index of its first chunk (host ints).
    num_chunks:  per sequence, its number of chunks (host ints).
    """

    size: int
    gather: torch.Tensor
    valid: torch.Tensor
    first_chunk: list[int]
    num_chunks: list[int]

    @property
    def total(self) -> int:
        return sum(self.num_chunks)

    def to_chunks(self, x: torch.Tensor, pad: float = 0.0) -> torch.Tensor:
        """[T, ...] -> [NC, L, ...] fp32, ``pad`` on padding positions."""
        padded = torch.cat([x.float(), x.new_full((1, *x.shape[1:]), pad, dtype=torch.float32)])
        return padded.index_select(0, self.gather).view(self.total, self.size, *x.shape[1:])

    def from_chunks(self, o: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[NC * L, ...] -> [T, ...]: every padding row lands on the extra row T, which is dropped."""
        out = torch.empty(num_tokens + 1, *o.shape[1:], dtype=o.dtype, device=o.device)
        out.index_copy_(0, self.gather, o)
        return out[:num_tokens]

    def carry_steps(self) -> Iterator[tuple[slice | torch.Tensor, torch.Tensor]]:
        """For each chunk index j: (the sequences that have a chunk j, as a slice when all do, else an
        index tensor into the batch; the indices of those chunks)."""
        device = self.gather.device
        bsz = len(self.num_chunks)
        for j in range(max(self.num_chunks, default=0)):
            live = [b for b in range(bsz) if self.num_chunks[b] > j]
            ids = torch.tensor([self.first_chunk[b] + j for b in live], dtype=torch.long, device=device)
            rows = slice(None) if len(live) == bsz else torch.tensor(live, dtype=torch.long, device=device)
            yield rows, ids


def chunk_layout(cu_seqlens: torch.Tensor, size: int, device: torch.device) -> ChunkLayout:
    """The chunks of ``size`` tokens of every sequence in ``cu_seqlens`` [B + 1]."""
    bounds = cu_seqlens.tolist()
    num_chunks = [(bounds[b + 1] - bounds[b] + size - 1) // size for b in range(len(bounds) - 1)]
    first_chunk = [0, *itertools.accumulate(num_chunks)][:-1]
    starts, ends = [], []
    for b, n in enumerate(num_chunks):
        starts += [bounds[b] + j * size for j in range(n)]
        ends += [bounds[b + 1]] * n
    start, end = torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long)
    pos = start.unsqueeze(1) + torch.arange(size)  # [NC, L]
    gather = torch.where(pos < end.unsqueeze(1), pos, bounds[-1])
    valid = (end - start).clamp(max=size)
    return ChunkLayout(size, gather.reshape(-1).to(device), valid.to(device), first_chunk, num_chunks)
