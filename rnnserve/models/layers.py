"""Small pieces several families share: RMS norms (plain and gated), DenseSSM's selection MLP and
the LM head helper.
Parameter names match the checkpoints (``norm.weight``), so families can load by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] normalised in fp32, cast to the weight's dtype, then scaled (as transformers'
    Mamba/LLaMA RMSNorm do when the input is already in the model dtype)."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op, same maths
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(weight.dtype)


def gated_rms_norm(
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    groups: int = 1,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """RMSNorm with a SiLU gate, over ``groups`` contiguous blocks of the last dim (y, gate [..., E]).

    norm_before_gate=False: ``norm(y ⊙ silu(gate)) ⊙ weight`` (Mamba-2); True: ``norm(y) ⊙ weight ⊙
    silu(gate)``."""
    shape = y.shape
    h = y.float()
    if not norm_before_gate:
        h = h * F.silu(gate.float())
    h = h.view(*shape[:-1], groups, shape[-1] // groups)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).view(shape)
    if norm_before_gate:
        return (weight * h.to(weight.dtype)) * F.silu(gate.float()).to(weight.dtype)
    return weight * h.to(weight.dtype)


class RMSNorm(nn.Module):
    """An RMSNorm whose only parameter is ``weight [D]`` (checkpoint name ``<prefix>.weight``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class DenseSelect(nn.Module):
    """DenseSSM's selection MLP, fc2(silu(fc1(x))): D -> D/32 -> out (the released DenseRetNet's
    ``k_select`` / ``v_select``, and DenseMamba's gate over earlier layers' outputs)."""

    def __init__(self, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size // 32, bias=False)
        self.fc2 = nn.Linear(hidden_size // 32, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def lm_logits(h: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Logits [M, V] in float32 (the sampler and logprobs need the precision) from h [M, D].

    On the CPU a row-major head (e.g. tied to the embedding) is applied as (W hᵀ)ᵀ: for a few rows
    that is up to 1.5x faster than ``F.linear``, which repacks the whole [V, D] matrix."""
    h = h.to(head.weight.dtype)
    w = head.weight
    if w.device.type == "cpu" and w.is_contiguous() and head.bias is None:
        return torch.mm(w, h.t()).t().float()
    return head(h).float()


def use_column_major_weight(linear: nn.Linear) -> None:
    """Store a linear layer's weight [out, in] column-major (the contiguous [in, out] transpose, seen
    through ``.t()``): same values, names and shape, but on the CPU ``F.linear`` then multiplies
    without repacking the weight, 2x faster for a decode batch of a few rows and no slower for a
    prefill. Do not use on a weight shared with an embedding (row lookups want row-major)."""
    linear.weight.data = linear.weight.data.t().contiguous().t()
