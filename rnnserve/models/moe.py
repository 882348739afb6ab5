"""Mixture-of-experts feed-forward: a top-k softmax router and experts stored as 3-D weights.

Per token x: router logits ``l = W_r x`` (fp32), the top-k experts by ``l``, weights
``softmax(l_topk)``; ``y = Σ_k w_k · W_out[e_k] (silu(g) ⊙ u)`` with ``[g, u] = W_in[e_k] x``.
The PyTorch path groups the (token, expert) assignments by expert (one stable sort), runs each
expert's two matrix products on all of its tokens at once and scatters the weighted results back
with one ``index_add_``: a Python loop over experts, never over tokens. ``grouped_experts`` is that
grouping alone, for families with their own router and experts (Nemotron-H: sigmoid scores, relu²).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def moe_forward(
    x: torch.Tensor, router: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, top_k: int
) -> torch.Tensor:
    """x [N, D]; router [E, D]; w_in [E, 2I, D] (gate rows, then up rows); w_out [E, D, I] -> [N, D]."""
    logits = F.linear(x, router).float()  # [N, E]
    top_logits, top_experts = logits.topk(top_k, dim=-1)  # [N, k]
    weights = torch.softmax(top_logits, dim=-1).to(x.dtype)  # [N, k]

    def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(xs, w_in[e]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(F.silu(gate) * up, w_out[e])

    return grouped_experts(x, top_experts, weights, router.shape[0], expert)


def grouped_experts(
    x: torch.Tensor,
    top_experts: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``Σ_k weights[:, k] · expert(top_experts[:, k], x)`` for x [N, D], top_experts and weights [N, k]
    -> [N, D], with ``expert(e, rows [n, D]) -> [n, D]`` called once per expert on all of its rows.
    The weighted sum is taken in ``weights``' dtype (fp32 weights: fp32 accumulation) and cast to x's."""
    top_k = top_experts.shape[1]
    flat = top_experts.reshape(-1)  # [N * k], assignment a = token * k + slot
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    tokens = order // top_k  # [N * k] the token of each grouped assignment
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # host: the group sizes
    xs = x.index_select(0, tokens)  # [N * k, D]
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            ys[start : start + n] = expert(e, xs[start : start + n])
            start += n
    ys = ys.to(weights.dtype) * weights.reshape(-1).index_select(0, order)[:, None]
    out = torch.zeros(x.shape, dtype=weights.dtype, device=x.device)
    return out.index_add_(0, tokens, ys).to(x.dtype)


class MoE(nn.Module):
    """Granite's ``block_sparse_moe``: ``router.layer`` [E, D], ``input_linear`` [E, 2I, D],
    ``output_linear`` [E, D, I] (checkpoint names)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Module()
        self.router.layer = nn.Linear(hidden_size, num_experts, bias=False)
        self.input_linear = nn.Module()
        self.input_linear.weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.output_linear = nn.Module()
        self.output_linear.weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_forward(x, self.router.layer.weight, self.input_linear.weight, self.output_linear.weight, self.top_k)
