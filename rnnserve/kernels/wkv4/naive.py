"""Sequential reference for the RWKV-4 WKV over a packed variable-length batch: one token at a time,
exactly the recurrence of the reference implementations (transformers' CPU path, the ``rwkv`` package)."""

from __future__ import annotations

import torch


def wkv4_naive(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    aa: torch.Tensor,
    bb: torch.Tensor,
    pp: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slot_ids: torch.Tensor,
) -> torch.Tensor:
    """w [C] (= -exp(time_decay), < 0), u [C] (time_first), k, v [T, C]; aa, bb, pp [S, C] fp32 updated in
    place at ``slot_ids`` [B]; cu_seqlens [B + 1]. Returns wkv [T, C] in fp32, or fp64 for fp64 inputs
    (tests use that as a tighter reference)."""
    dtype = torch.promote_types(k.dtype, torch.float32)
    w, u = w.to(dtype), u.to(dtype)
    out = torch.empty(k.shape, dtype=dtype, device=k.device)
    bounds = cu_seqlens.tolist()
    for b, slot in enumerate(slot_ids.tolist()):
        a, bs, p = aa[slot].to(dtype), bb[slot].to(dtype), pp[slot].to(dtype)  # [C] each
        for t in range(bounds[b], bounds[b + 1]):
            kt, vt = k[t].to(dtype), v[t].to(dtype)
            q = torch.maximum(p, u + kt)
            e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
            out[t] = (e1 * a + e2 * vt) / (e1 * bs + e2)
            q = torch.maximum(p + w, kt)
            e1, e2 = torch.exp(p + w - q), torch.exp(kt - q)
            a, bs, p = e1 * a + e2 * vt, e1 * bs + e2, q
        aa[slot], bb[slot], pp[slot] = a, bs, p
    return out
