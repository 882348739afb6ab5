"""Varlen causal conv for prefill: every sequence of the packed batch at once.

Each sequence is extended with its slot's cached K-1 inputs in front (one gather over the whole
packed batch), then the depthwise conv is K shifted multiply-adds over the extended rows, and the
last K-1 rows of each extended sequence become the new cache. Outputs are taken only at rows whose
K-1 predecessors belong to the same extended sequence, so sequences never leak into each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnnserve.kernels.chunking import Varlen


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """x [T, C], weight [C, K], bias [C] | None, conv_state [S, C, K-1] (updated in place),
    cu_seqlens [B+1] int32 or the step's ``Varlen`` (its cached token -> sequence map is used),
    slot_ids [B] int64 -> y [T, C] in x's dtype."""
    T, C = x.shape
    K = weight.shape[1]
    L = K - 1
    B = slot_ids.shape[0]
    dev = x.device
    seqs = Varlen.of(cu_seqlens)
    cu = seqs.cu_seqlens.to(device=dev, dtype=torch.long)

    # Rows of the extended batch: sequence b occupies ext_cu[b] : ext_cu[b+1] = its L cached inputs,
    # then its tokens; token t of sequence b sits at extended row t + (b+1)*L.
    ext_cu = cu + torch.arange(B + 1, device=dev) * L  # [B+1]
    seq_of_tok = seqs.seq_of_token()  # [T]
    tok_rows = torch.arange(T, device=dev) + (seq_of_tok + 1) * L  # [T]
    cache_rows = (ext_cu[:-1, None] + torch.arange(L, device=dev)).reshape(-1)  # [B*L]
    xe = torch.empty(T + B * L, C, device=dev)  # fp32
    xe.index_copy_(0, tok_rows, x.float())
    xe.index_copy_(0, cache_rows, conv_state[slot_ids].transpose(1, 2).reshape(B * L, C).float())

    # Convolve every window of L+1 consecutive extended rows (contiguous slices, no gathers); row i of
    # `full` is the window ending at extended row i + L. Only rows ending at a token are kept, so
    # windows straddling two sequences are never used.
    n = T + B * L - L
    w = weight.float()  # [C, K]
    full = torch.mul(xe[L:], w[:, L])  # [n, C]
    for k in range(L):
        full.addcmul_(xe[k : k + n], w[:, k])
    if bias is not None:
        full.add_(bias.float())
    y = full[tok_rows - L]  # [T, C]
    if activation == "silu":
        F.silu(y, inplace=True)

    # New cache: the last L rows of each extended sequence (old cache rows when the prompt is shorter).
    last = ext_cu[1:, None] - L + torch.arange(L, device=dev)  # [B, L]
    conv_state[slot_ids] = xe[last].transpose(1, 2).to(conv_state.dtype)  # [B, C, L]
    return y.to(x.dtype)
