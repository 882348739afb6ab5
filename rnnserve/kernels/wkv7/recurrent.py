"""One RWKV-7 WKV decode step, in place by slot index."""

from __future__ import annotations

import torch


def wkv7_step(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
) -> torch.Tensor:
    """One token per sequence. r, log_w, k, a, b [B, H, K]; v [B, H, V]; state [S, H, K, V] fp32 (rows
    ``slot_ids`` [B] updated in place). ``S ← diag(e^{log_w}) S + b (aᵀ S) + k vᵀ``, ``o = rᵀ S``.
    Returns o [B, H, V] fp32. No host sync, no data-dependent shapes."""
    s = state.index_select(0, slot_ids).float()  # [B, H, K, V]
    sa = torch.matmul(a.float().unsqueeze(-2), s)  # [B, H, 1, V], aᵀ S
    s = (
        log_w.float().exp().unsqueeze(-1) * s
        + b.float().unsqueeze(-1) * sa
        + k.float().unsqueeze(-1) * v.float().unsqueeze(-2)
    )
    o = torch.matmul(r.float().unsqueeze(-2), s).squeeze(-2)  # [B, H, V]
    state.index_copy_(0, slot_ids, s.to(state.dtype))
    return o
