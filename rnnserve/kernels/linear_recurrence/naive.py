"""Sequential reference: one token at a time, one sequence at a time, fp32. Slow and obviously correct."""

from __future__ import annotations

import torch


def _check_groups(q: torch.Tensor, v: torch.Tensor) -> int:
    """Heads per group R = H // G (head h reads q/k group h // R)."""
    groups, heads = q.shape[1], v.shape[1]
    if heads % groups != 0:
        raise ValueError(f"number of heads {heads} is not a multiple of the number of q/k groups {groups}")
    return heads // groups


def linear_recurrence_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """``S_t = exp(log_decay_t) S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t`` per head.

    q, k: [T, G, K]; v: [T, H, V]; log_decay: [T, H]; state: [S, H, K, V] fp32, read from and written
    back to ``state[slot_ids[b]]``; cu_seqlens: [B + 1]; slot_ids: [B]. Returns o [T, H, V] in v's dtype.
    """
    rep = _check_groups(q, v)
    qh = q.float().repeat_interleave(rep, dim=1)  # [T, H, K]
    kh = k.float().repeat_interleave(rep, dim=1)  # [T, H, K]
    vf = v.float()  # [T, H, V]
    decay = log_decay.float().exp()  # [T, H]
    out = torch.empty_like(vf)
    bounds = cu_seqlens.tolist()
    for b, slot in enumerate(slot_ids.tolist()):
        s = state[slot].float().clone()  # [H, K, V]
        for t in range(bounds[b], bounds[b + 1]):
            s = decay[t, :, None, None] * s + kh[t, :, :, None] * vf[t, :, None, :]
            out[t] = scale * torch.einsum("hk,hkv->hv", qh[t], s)
        state[slot] = s.to(state.dtype)
    return out.to(v.dtype)
