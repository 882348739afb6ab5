"""Varlen prefill over a packed batch, attending through block tables (PyTorch).

Every sequence's new keys and values are written into its blocks first; then its queries attend to
the whole cached prefix plus themselves, causally. The batch is gathered once into a padded
``[B, L, Hkv, D]`` view of keys and a ``[B, Q, H, D]`` view of queries, with a mask for causality and
padding, and runs as one batched attention (split along the query axis only to bound the score
matrix): no per-sequence Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnnserve.kernels.paged_attention.cache import gather_padded, write_kv
from rnnserve.kernels.paged_attention.naive import check_gqa

# Score elements (B * H * Q * L) per attention call: bounds the memory of long prompts in big batches.
_MAX_SCORE_ELEMENTS = 1 << 25


def paged_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
) -> torch.Tensor:
    """q [T, H, D], k, v [T, Hkv, D] packed by ``cu_seqlens`` [B+1] int32; caches [NB, bs, Hkv, D];
    ``seq_lens`` [B] int32 = cached + new tokens of each sequence after this call; ``block_tables``
    [B, max_blocks] int32; ``slot_mapping`` [T] int64 (where each new token goes); host ints
    ``max_query_len`` = max new tokens, ``max_seq_len`` = max(seq_lens). Returns o [T, H, D].

    Sequence b's new tokens sit at positions ``seq_lens[b] - n_b .. seq_lens[b] - 1``.
    """
    total, heads, _ = q.shape
    check_gqa(heads, k.shape[1])
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    batch = seq_lens.shape[0]
    if total == 0 or batch == 0:
        return torch.empty_like(q)
    device = q.device
    starts = cu_seqlens[:-1].long()  # [B]
    q_lens = cu_seqlens[1:].long() - starts  # [B]
    ctx = seq_lens.long() - q_lens  # [B] tokens cached before this chunk
    offs = torch.arange(max_query_len, device=device)  # [Q]
    q_valid = offs[None, :] < q_lens[:, None]  # [B, Q]
    rows = (starts[:, None] + offs[None, :]).clamp_(max=total - 1)  # [B, Q], padding rows clamped
    q_pad = q[rows].transpose(1, 2)  # [B, H, Q, D]
    keys = gather_padded(k_cache, block_tables, max_seq_len, "k").transpose(1, 2)  # [B, Hkv, L, D]
    vals = gather_padded(v_cache, block_tables, max_seq_len, "v").transpose(1, 2)
    q_pos = ctx[:, None] + offs[None, :]  # [B, Q] absolute positions
    k_pos = torch.arange(max_seq_len, device=device)  # [L]
    # Causal; padding keys lie past seq_len > every real query's position. Padding query rows still
    # see key 0, so no row is fully masked (no NaN), and they are dropped below.
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]
    q_block = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * heads * max_seq_len))
    out = torch.empty_like(q_pad)
    for lo in range(0, max_query_len, q_block):
        hi = min(lo + q_block, max_query_len)
        out[:, :, lo:hi] = F.scaled_dot_product_attention(
            q_pad[:, :, lo:hi],
            keys,
            vals,
            attn_mask=mask[:, None, lo:hi],
            scale=scale,
            enable_gqa=True,
        )
    return out.transpose(1, 2)[q_valid]  # [T, H, D], packed order (b, then i)
