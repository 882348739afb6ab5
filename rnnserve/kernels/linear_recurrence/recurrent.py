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
    if heads % groups:
        raise ValueError(f"number of heads {heads} is not a multiple of the number of q/k groups {groups}")
    rep = heads // groups
    # A decode step is bound by state memory traffic (a state is [H, K, V] fp32 per layer and sequence), so
    # the update is done in place on one gathered copy: s *= decay, then s += kᵀv as a batched rank-1
    # update (baddbmm) without materialising kᵀv. Heads are group-major (head h reads group h // rep).
    s = state.index_select(0, slot_ids).float()  # [B, H, K, V]
    s.mul_(log_decay.float().exp().view(bsz, heads, 1, 1))
    kh = k.float().view(bsz, groups, 1, dk).expand(bsz, groups, rep, dk).reshape(bsz * heads, dk, 1)
    s.view(bsz * heads, dk, dv).baddbmm_(kh, v.float().reshape(bsz * heads, 1, dv))
    qh = q.float().view(bsz, groups, 1, dk).expand(bsz, groups, rep, dk).reshape(bsz * heads, 1, dk)
    o = torch.bmm(qh, s.view(bsz * heads, dk, dv))  # [B*H, 1, V]
    state.index_copy_(0, slot_ids, s.to(state.dtype))
    return (scale * o).view(bsz, heads, dv).to(v.dtype)
