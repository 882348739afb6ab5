"""Dense references, fp32: plain causal attention over contiguous K/V, no cache, no blocks.

``paged_attention_naive`` reads the same paged cache as the fast paths but one sequence and one
query at a time, through Python lists; it is the slow, obviously correct reading of the layout.
"""

from __future__ import annotations

import torch


def check_gqa(num_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head (head h reads KV head h // group)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"number of heads {num_heads} is not a multiple of the number of KV heads {num_kv_heads}")
    return num_heads // num_kv_heads


def causal_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [Q, H, D] are the last Q of the L positions of k, v [L, Hkv, D] (Q <= L).

    Query i sits at position L - Q + i and attends to keys 0..L - Q + i. Returns o [Q, H, D] in
    q's dtype, computed in fp32.
    """
    num_q, heads, _ = q.shape
    length = k.shape[0]
    if num_q > length:
        raise ValueError(f"{num_q} queries but only {length} keys")
    group = check_gqa(heads, k.shape[1])
    kf = k.float().repeat_interleave(group, dim=1)  # [L, H, D]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale  # [H, Q, L]
    q_pos = torch.arange(length - num_q, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def paged_attention_naive(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of packed queries q [T, H, D] over a paged cache that already holds every key.

    Sequence b's queries are the last ``cu_seqlens[b+1] - cu_seqlens[b]`` of its ``seq_lens[b]``
    cached positions; position p lives at ``k_cache[block_tables[b, p // bs], p % bs]``
    (k_cache, v_cache [num_blocks, bs, Hkv, D]). Returns o [T, H, D].
    """
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        table = block_tables[b].tolist()
        rows = [table[p // block_size] * block_size + p % block_size for p in range(length)]
        keys = k_cache.flatten(0, 1)[rows]  # [L, Hkv, D]
        vals = v_cache.flatten(0, 1)[rows]
        s, e = bounds[b], bounds[b + 1]
        if e > s:
            out[s:e] = causal_attention_naive(q[s:e], keys, vals, scale)
    return out
