"""A packed variable-length batch's sequence boundaries (``Varlen``) and the fixed-size chunks the
chunked prefills cut it into (``ChunkLayout``).

Every sequence is cut into chunks of L tokens that never cross a sequence boundary, and all chunks of
the batch are gathered into one ``[NC, L, ...]`` block (NC = total chunks), padded after each
sequence's last token. A chunked kernel then works on all chunks at once, and only the carry of the
state from one chunk of a sequence to the next is sequential: a loop over the chunk index, batched
over the sequences that still have a chunk there (``carry_steps``).

The boundaries and layouts are step metadata: the engine's runner builds one ``Varlen`` per step from
host integers, and every layer's kernel reads the same host copy and the same cached layouts, so no
layer synchronises with the device or rebuilds them. A kernel called with a bare ``cu_seqlens`` tensor
(tests, scripts) wraps it with ``Varlen.of``, which copies it to the host once, on first use.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
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
    steps:       per chunk index j, (the sequences that have a chunk j: a slice when all do, else an
                 int64 index tensor; the indices of those chunks), for the carry loop.
    """

    size: int
    gather: torch.Tensor
    valid: torch.Tensor
    first_chunk: list[int]
    num_chunks: list[int]
    steps: tuple[tuple[slice | torch.Tensor, torch.Tensor], ...]

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
        index tensor into the batch; the indices of those chunks). Built once with the layout."""
        return iter(self.steps)


class Varlen:
    """Sequence boundaries of a packed batch: ``cu_seqlens`` [B + 1] int32 on the device, the same
    numbers on the host (``bounds``), and what kernels derive from them, built on first use and cached
    (the token -> sequence map, one chunk layout per chunk size), so every layer of a step shares them."""

    def __init__(self, cu_seqlens: torch.Tensor, bounds: Sequence[int] | None = None) -> None:
        self.cu_seqlens = cu_seqlens
        self._bounds = None if bounds is None else tuple(bounds)
        self._layouts: dict[int, ChunkLayout] = {}
        self._seq_of_token: torch.Tensor | None = None

    @classmethod
    def from_bounds(cls, bounds: Sequence[int], device: torch.device | str) -> Varlen:
        """From host boundaries [0, len_0, len_0 + len_1, ...]: one host-to-device copy."""
        return cls(torch.tensor(bounds, dtype=torch.int32, device=device), bounds)

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor | Varlen) -> Varlen:
        """A kernel's ``cu_seqlens`` argument as a Varlen (a bare tensor is wrapped, not copied yet)."""
        return cu_seqlens if isinstance(cu_seqlens, Varlen) else cls(cu_seqlens)

    @property
    def bounds(self) -> tuple[int, ...]:
        """The boundaries as host ints (copied from the device only for a Varlen built without them)."""
        if self._bounds is None:
            self._bounds = tuple(self.cu_seqlens.tolist())
        return self._bounds

    @property
    def num_seqs(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1]

    def seq_of_token(self) -> torch.Tensor:
        """[T] int64 on the device: the sequence each packed token belongs to."""
        if self._seq_of_token is None:
            b = self.bounds
            seq = [i for i in range(len(b) - 1) for _ in range(b[i + 1] - b[i])]
            self._seq_of_token = torch.tensor(seq, dtype=torch.long).to(self.cu_seqlens.device)
        return self._seq_of_token

    def layout(self, size: int) -> ChunkLayout:
        """The chunks of ``size`` tokens of every sequence (cached per size)."""
        if size not in self._layouts:
            self._layouts[size] = chunk_layout(self.bounds, size, self.cu_seqlens.device)
        return self._layouts[size]


def chunk_layout(bounds: Sequence[int], size: int, device: torch.device) -> ChunkLayout:
    """The chunks of ``size`` tokens of every sequence whose host boundaries are ``bounds`` [B + 1]."""
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
    bsz = len(num_chunks)
    steps = []
    for j in range(max(num_chunks, default=0)):
        live = [b for b in range(bsz) if num_chunks[b] > j]
        ids = torch.tensor([first_chunk[b] + j for b in live], dtype=torch.long, device=device)
        rows = slice(None) if len(live) == bsz else torch.tensor(live, dtype=torch.long, device=device)
        steps.append((rows, ids))
    return ChunkLayout(size, gather.reshape(-1).to(device), valid.to(device), first_chunk, num_chunks, tuple(steps))
