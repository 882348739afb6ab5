"""One decode step of the scalar-decay linear recurrence, in place by slot index."""

from __future__ import annotations

import torch


def linear_recurrence_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """One token per sequence: ``S ← exp(log_decay) S + kᵀ v``, ``o = scale · q S``.

    q, k: [B, G, K]; v: [B, H, V]; log_decay: [B, H]; state: [S, H, K, V] fp32 (row ``slot_ids[b]`` is
    updated in place); slot_ids: [B]. Returns o [B, H, V] in v's dtype. No host sync, no
    data-dependent shapes (CUDA-graph safe).
    """
    bsz, groups, dk = q.shape
    heads, dv = v.shape[1], v.shape[2]
    rep = heads // groups
    # Heads are laid out group-major (head h reads group h // rep), so [B, H, ...] views as [B, G, rep, ...].
    s = state.index_select(0, slot_ids).float().view(bsz, groups, rep, dk, dv)  # [B, G, R, K, V]
    decay = log_decay.float().exp().view(bsz, groups, rep, 1, 1)
    kv = k.float().view(bsz, groups, 1, dk, 1) * v.float().view(bsz, groups, rep, 1, dv)  # [B, G, R, K, V]
    s = decay * s + kv
    o = torch.matmul(q.float().view(bsz, groups, 1, 1, dk), s)  # [B, G, R, 1, V]
    state.index_copy_(0, slot_ids, s.view(bsz, heads, dk, dv).to(state.dtype))
    return (scale * o).view(bsz, heads, dv).to(v.dtype)
