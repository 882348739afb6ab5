"""Sequential reference for the varlen causal conv: one token at a time, one sequence at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slot_ids: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """x [T, C], weight [C, K], bias [C], conv_state [S, C, K-1] (updated in place) -> y [T, C]."""
    y = torch.empty_like(x)
    w = weight.float()
    for b in range(slot_ids.shape[0]):
        slot = int(slot_ids[b])
        window = conv_state[slot].float()  # [C, K-1], oldest input first
        for t in range(int(cu_seqlens[b]), int(cu_seqlens[b + 1])):
            window = torch.cat([window, x[t].float()[:, None]], dim=1)  # [C, K]
            out = (window * w).sum(dim=1)
            if bias is not None:
                out = out + bias.float()
            if activation == "silu":
                out = F.silu(out)
            y[t] = out.to(y.dtype)
            window = window[:, 1:]
        conv_state[slot] = window.to(conv_state.dtype)
    return y
