"""One-token decode step reading each request's blocks through its block table (PyTorch).

The new key and value are written into the cache first; every sequence's cached positions are then
gathered into one padded ``[B, L, Hkv, D]`` view (L = the longest sequence) and attended with a
length mask, in one batched call: no per-sequence Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnnserve.kernels.paged_attention.cache import gather_padded, write_kv
from rnnserve.kernels.paged_attention.naive import check_gqa


def paged_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """q [B, H, D], k, v [B, Hkv, D] (the new token of each sequence, written at ``slot_mapping`` [B]
    int64); ``seq_lens`` [B] int32 including the new token (>= 1); ``block_tables`` [B, max_blocks]
    int32; host int ``max_seq_len`` = max(seq_lens). Returns o [B, H, D]."""
    batch, heads, _ = q.shape
    check_gqa(heads, k.shape[1])
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    if batch == 0:
        return torch.empty_like(q)
    keys = gather_padded(k_cache, block_tables, max_seq_len, "k").transpose(1, 2)  # [B, Hkv, L, D]
    vals = gather_padded(v_cache, block_tables, max_seq_len, "v").transpose(1, 2)
    k_pos = torch.arange(max_seq_len, device=q.device)
    mask = (k_pos[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    o = F.scaled_dot_product_attention(q[:, :, None, :], keys, vals, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[:, :, 0]  # [B, H, D]
