"""One RWKV-4 WKV decode step, in place by slot index."""

from __future__ import annotations

import torch


def wkv4_step(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    aa: torch.Tensor,
    bb: torch.Tensor,
    pp: torch.Tensor,
    slot_ids: torch.Tensor,
) -> torch.Tensor:
    """One token per sequence. w, u [C]; k, v [B, C]; aa, bb, pp [S, C] fp32 (rows ``slot_ids`` [B]
    updated in place). Returns wkv [B, C] fp32. No host sync, no data-dependent shapes."""
    w, u = w.float(), u.float()
    k, v = k.float(), v.float()
    a = aa.index_select(0, slot_ids)  # [B, C]
    b = bb.index_select(0, slot_ids)
    p = pp.index_select(0, slot_ids)
    uk = u + k
    q = torch.maximum(p, uk)
    e1, e2 = torch.exp(p - q), torch.exp(uk - q)
    out = (e1 * a + e2 * v) / (e1 * b + e2)
    pw = p + w
    q = torch.maximum(pw, k)
    e1, e2 = torch.exp(pw - q), torch.exp(k - q)
    aa.index_copy_(0, slot_ids, e1 * a + e2 * v)
    bb.index_copy_(0, slot_ids, e1 * b + e2)
    pp.index_copy_(0, slot_ids, q)
    return out
