"""Sequential reference for the RWKV-7 WKV over a packed variable-length batch, one token at a time."""

from __future__ import annotations

import torch


def wkv7_naive(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slot_ids: torch.Tensor,
) -> torch.Tensor:
    """r, log_w, k, a, b [T, H, K]; v [T, H, V]; state [S, H, K, V] fp32, updated in place at ``slot_ids``
    [B]; cu_seqlens [B + 1]. Per token: ``S ← diag(e^{log_w}) S + b (aᵀ S) + k vᵀ``, ``o = rᵀ S``.
    Returns o [T, H, V] in fp32, or fp64 for fp64 inputs (tests use that as a tighter reference)."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    out = torch.empty(v.shape, dtype=dtype, device=v.device)
    bounds = cu_seqlens.tolist()
    for i, slot in enumerate(slot_ids.tolist()):
        s = state[slot].to(dtype)  # [H, K, V]
        for t in range(bounds[i], bounds[i + 1]):
            at, bt = a[t].to(dtype), b[t].to(dtype)  # [H, K]
            sa = torch.einsum("hk,hkv->hv", at, s)  # [H, V]
            s = (
                log_w[t].to(dtype).exp().unsqueeze(-1) * s
                + bt.unsqueeze(-1) * sa.unsqueeze(1)
                + k[t].to(dtype).unsqueeze(-1) * v[t].to(dtype).unsqueeze(1)
            )
            out[t] = torch.einsum("hk,hkv->hv", r[t].to(dtype), s)
        state[slot] = s.to(state.dtype)
    return out
