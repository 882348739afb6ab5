"""Paged-attention test cases shared by the PyTorch and Triton kernel tests: random sequences
whose prefix is already in a paged cache (blocks scattered in a shuffled order, block 0 left as the
padding block), new tokens to add, and the dense reference output for them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnserve.kernels.paged_attention.naive import causal_attention_naive


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, H, D] new queries, packed
    k: torch.Tensor  # [T, Hkv, D] new keys, packed
    v: torch.Tensor
    k_cache: torch.Tensor  # [NB, BS, Hkv, D] holding every sequence's prefix
    v_cache: torch.Tensor
    cu_seqlens: torch.Tensor  # [B+1] int32 over the new tokens
    seq_lens: torch.Tensor  # [B] int32, prefix + new
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    expected: torch.Tensor  # [T, H, D] dense causal attention, fp32
    full_k: list[torch.Tensor]  # per sequence [L, Hkv, D]: what the cache must hold afterwards
    full_v: list[torch.Tensor]
    scale: float

    @property
    def max_query_len(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())

    def cached_rows(self, b: int) -> torch.Tensor:
        """The cache rows of sequence b's positions 0..seq_len-1 (flattened [NB * BS] index)."""
        bs = self.k_cache.shape[1]
        pos = torch.arange(int(self.seq_lens[b]))
        blocks = self.block_tables[b].cpu().long()[pos // bs]
        return blocks * bs + pos % bs


def make_case(
    prefix_lens: list[int],
    new_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> PagedCase:
    g = torch.Generator().manual_seed(seed)
    lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3  # + the padding block 0 and two never used
    max_blocks = max(need) + 1  # a wider table than needed: trailing entries must not be read
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # physical blocks, shuffled, never 0
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    # Cache garbage everywhere (not zeros), so a read of a wrong position changes the result.
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    qs, ks, vs, expected, full_k, full_v, slots = [], [], [], [], [], [], []
    scale = head_dim**-0.5
    for b, (p, n) in enumerate(zip(prefix_lens, new_lens)):
        fk = torch.randn(p + n, kv_heads, head_dim, generator=g).to(dtype)
        fv = torch.randn(p + n, kv_heads, head_dim, generator=g).to(dtype)
        q = torch.randn(n, heads, head_dim, generator=g).to(dtype)
        pos = torch.arange(p + n)
        rows = tables[b].long()[pos // block_size] * block_size + pos % block_size
        k_cache.view(-1, kv_heads, head_dim)[rows[:p]] = fk[:p].float()
        v_cache.view(-1, kv_heads, head_dim)[rows[:p]] = fv[:p].float()
        slots.append(rows[p:])
        qs.append(q)
        ks.append(fk[p:])
        vs.append(fv[p:])
        full_k.append(fk)
        full_v.append(fv)
        expected.append(causal_attention_naive(q.float(), fk.float(), fv.float(), scale))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(new_lens).cumsum(0)
    dev = torch.device(device)
    return PagedCase(
        q=torch.cat(qs).to(dev),
        k=torch.cat(ks).to(dev),
        v=torch.cat(vs).to(dev),
        k_cache=k_cache.to(dev, dtype),
        v_cache=v_cache.to(dev, dtype),
        cu_seqlens=cu.to(dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        block_tables=tables.to(dev),
        slot_mapping=torch.cat(slots).to(dev),
        expected=torch.cat(expected),
        full_k=full_k,
        full_v=full_v,
        scale=scale,
    )


def check_cache(case: PagedCase, untouched_k: torch.Tensor) -> None:
    """Every sequence's positions hold its full keys and values; every other row is unchanged."""
    flat_k = case.k_cache.view(-1, *case.k_cache.shape[2:]).cpu()
    flat_v = case.v_cache.view(-1, *case.v_cache.shape[2:]).cpu()
    used = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    for b in range(case.seq_lens.shape[0]):
        rows = case.cached_rows(b)
        assert torch.equal(flat_k[rows], case.full_k[b].to(flat_k.dtype))
        assert torch.equal(flat_v[rows], case.full_v[b].to(flat_v.dtype))
        used[rows] = True
    assert torch.equal(flat_k[~used], untouched_k.view(-1, *untouched_k.shape[2:]).cpu()[~used])


# (prefix lengths, new lengths): single sequences of 1, 15, 16, 17 and 500 tokens; prefixes ending
# on and around block boundaries; a varlen batch mixing them.
PREFILL_CASES = [
    ([0], [1]),
    ([0], [15]),
    ([0], [16]),
    ([0], [17]),
    ([0], [500]),
    ([16], [1]),
    ([15], [2]),
    ([17], [31]),
    ([0, 16, 15, 33, 0, 7], [5, 1, 17, 40, 16, 9]),
]
# Lengths of decoding sequences after their new token.
DECODE_LENS = [[1], [15], [16], [17], [500], [1, 15, 16, 17, 33, 64, 3]]
# (heads, kv_heads, head_dim): MHA, GQA 2:1, GQA 3:1 with an odd head dim.
HEAD_SHAPES = [(2, 2, 16), (4, 2, 8), (3, 1, 12)]


def run_prefill(fn, case: PagedCase) -> torch.Tensor:
    """``fn`` is a ``paged_attention_prefill`` (PyTorch or Triton) applied to the case."""
    return fn(
        case.q,
        case.k,
        case.v,
        case.k_cache,
        case.v_cache,
        case.cu_seqlens,
        case.seq_lens,
        case.block_tables,
        case.slot_mapping,
        case.scale,
        case.max_query_len,
        case.max_seq_len,
    )


def run_decode(fn, case: PagedCase) -> torch.Tensor:
    """``fn`` is a ``paged_attention_decode`` applied to the case (one new token per sequence)."""
    return fn(
        case.q,
        case.k,
        case.v,
        case.k_cache,
        case.v_cache,
        case.seq_lens,
        case.block_tables,
        case.slot_mapping,
        case.scale,
        case.max_seq_len,
    )
