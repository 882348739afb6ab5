"""One-token causal conv step (decode): shift the new input into each slot's cache and convolve."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    slot_ids: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """x [B, C], conv_state [S, C, K-1] (updated in place), weight [C, K], bias [C] | None,
    slot_ids [B] int64 -> y [B, C] in x's dtype."""
    window = torch.cat(
        [conv_state.index_select(0, slot_ids), x.unsqueeze(-1).to(conv_state.dtype)], dim=-1
    )  # [B, C, K]
    conv_state.index_copy_(0, slot_ids, window[..., 1:])
    y = (window.float() * weight.float()).sum(-1)  # [B, C]
    if bias is not None:
        y = y + bias.float()
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)
