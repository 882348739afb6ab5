"""Sequential reference for the varlen selective scan: one token at a time, one sequence at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_varlen(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slot_ids: torch.Tensor,
    dt_softplus: bool = True,
) -> torch.Tensor:
    """x, dt, z [T, E]; A [E, N]; B, C [T, N]; D, dt_bias [E]; ssm_state [S, E, N] fp32 (updated
    in place) -> y [T, E] in x's dtype."""
    y = torch.empty_like(x)
    A = A.float()
    for b in range(slot_ids.shape[0]):
        slot = int(slot_ids[b])
        s = ssm_state[slot].float()  # [E, N]
        for t in range(int(cu_seqlens[b]), int(cu_seqlens[b + 1])):
            delta = dt[t].float() + (dt_bias.float() if dt_bias is not None else 0.0)  # [E]
            if dt_softplus:
                delta = F.softplus(delta)
            xt = x[t].float()
            s = torch.exp(delta[:, None] * A) * s + (delta * xt)[:, None] * B[t].float()[None, :]
            out = s @ C[t].float()  # [E]
            if D is not None:
                out = out + D.float() * xt
            if z is not None:
                out = out * F.silu(z[t].float())
            y[t] = out.to(y.dtype)
        ssm_state[slot] = s.to(ssm_state.dtype)
    return y
