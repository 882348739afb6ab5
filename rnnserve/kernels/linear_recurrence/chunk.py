"""Chunked (SSD) prefill of the scalar-decay linear recurrence over a packed variable-length batch.

Each sequence is cut into chunks of ``chunk_size`` tokens that never cross a sequence boundary; all
chunks of the batch are gathered into one zero-padded ``[NC, L, ...]`` block so that the work inside
chunks is a handful of batched matrix multiplies. Only the carry of the state from one chunk to the
next is sequential: a loop over chunk index (``ceil(max_seqlen / L)`` steps), batched over sequences.
See README.md for the maths.
"""

from __future__ import annotations

import torch

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.linear_recurrence.naive import _check_groups

DEFAULT_CHUNK_SIZE = 64


def linear_recurrence_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``S_t = exp(log_decay_t) S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t``, chunked.

    q, k: [T, G, K]; v: [T, H, V] with H % G == 0 (head h reads group h // (H // G)); log_decay: [T, H]
    (<= 0); state: [S, H, K, V] fp32: sequence b starts from ``state[slot_ids[b]]`` and its final state
    is written back there; cu_seqlens: [B + 1] int32 or the step's ``Varlen`` (whose cached chunk
    layout is used). Returns o [T, H, V] in v's dtype.
    """
    rep = _check_groups(q, v)
    num_tokens, groups, dk = q.shape
    heads, dv = v.shape[1], v.shape[2]
    bsz = slot_ids.shape[0]
    L = chunk_size
    lay = Varlen.of(cu_seqlens).layout(L)
    nc = lay.total

    # Layouts: the carried state is kept as [.., G, K, R*V] (the R heads of a group side by side), so that
    # the per-group q and k meet all R heads of their group in one matrix multiply, without broadcast
    # copies of q or k. v's packed order [.., H, V] is already [.., G, R, V].
    qc = lay.to_chunks(q).transpose(1, 2)  # [NC, G, L, K]
    kc = lay.to_chunks(k).transpose(1, 2)  # [NC, G, L, K]
    vl = lay.to_chunks(v).view(nc, L, groups, rep, dv).transpose(1, 2)  # [NC, G, L, R, V]
    # Padding has log-decay 0 (decay 1) and k = v = 0, so it leaves a chunk's carried state unchanged.
    a = lay.to_chunks(log_decay).view(nc, L, groups, rep).permute(0, 2, 3, 1)  # [NC, G, R, L]
    acum = a.cumsum(-1)  # [NC, G, R, L], A_i

    # seg[i, j] = A_i - A_j = Σ_{j<m<=i} a_m, summed directly rather than subtracted: A_i - A_j loses
    # all precision when both are large. Masked to -inf above the diagonal *before* exp (there it is
    # positive, could overflow, and inf·0 is nan).
    strict = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
    seg = a.unsqueeze(-1).expand(*a.shape, L).masked_fill(~strict, 0.0).cumsum(-2)  # [NC, G, R, L, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    decay_ij = torch.exp(seg.masked_fill_(~causal, float("-inf")))

    # Intra-chunk: o_i = Σ_{j<=i} (q_i·k_j) exp(A_i - A_j) v_j.
    scores = torch.matmul(qc, kc.transpose(-1, -2)).unsqueeze(2)  # [NC, G, 1, L, L]
    o_intra = torch.matmul(scores * decay_ij, vl.transpose(2, 3))  # [NC, G, R, L, V]

    # Each chunk's own contribution to the state at its end: Σ_j exp(A_L - A_j) k_jᵀ v_j; the last row
    # of decay_ij is exp(A_L - A_j).
    v_to_end = vl * decay_ij[..., -1, :].transpose(-1, -2).unsqueeze(-1)  # [NC, G, L, R, V]
    chunk_kv = torch.matmul(kc.transpose(-1, -2), v_to_end.view(nc, groups, L, rep * dv))  # [NC, G, K, R*V]
    chunk_kv = chunk_kv.view(nc, groups, dk, rep, dv)
    chunk_decay = torch.exp(acum[..., -1]).view(nc, groups, 1, rep, 1)  # [NC, G, 1, R, 1]

    # Carry the state across chunks: S_in[c] is the state entering chunk c. Sequential over the chunk
    # index only, batched over all sequences still running at that index.
    s_cur = state.index_select(0, slot_ids).float().view(bsz, groups, rep, dk, dv).transpose(2, 3).contiguous()
    s_in = torch.empty(nc, groups, dk, rep, dv, dtype=torch.float32, device=q.device)  # [NC, G, K, R, V]
    for rows, chunk_ids in lay.carry_steps():
        prev = s_cur[rows]
        s_in[chunk_ids] = prev
        s_cur[rows] = chunk_decay[chunk_ids] * prev + chunk_kv[chunk_ids]
    state.index_copy_(0, slot_ids, s_cur.transpose(2, 3).reshape(bsz, heads, dk, dv).to(state.dtype))

    # Inter-chunk: o_i += exp(A_i) q_i S_in.
    o = torch.matmul(qc, s_in.view(nc, groups, dk, rep * dv)).view(nc, groups, L, rep, dv)  # [NC, G, L, R, V]
    o.mul_(torch.exp(acum).transpose(-1, -2).unsqueeze(-1)).add_(o_intra.transpose(2, 3))
    o = (scale * o).transpose(1, 2).reshape(nc * L, heads, dv)  # [NC*L, H, V]
    return lay.from_chunks(o, num_tokens).to(v.dtype)
