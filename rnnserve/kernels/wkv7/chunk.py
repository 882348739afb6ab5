"""Chunked RWKV-7 WKV prefill over a packed variable-length batch (the WY / UT form of the
diagonal-plus-low-rank delta rule).

Every sequence is cut into chunks of ``chunk_size`` tokens that never cross a sequence boundary and
all chunks of the batch are gathered into one ``[NC, H, L, ...]`` block, padded with identity steps
(log_w = 0, k = v = a = b = r = 0 leave the state unchanged). Inside a chunk the recurrence is
unrolled into lower-triangular L×L matrices and one unit-triangular solve, all chunks at once; what
is left per chunk is an affine map of the state entering it, ``S_out = P S_in + Q`` and
``O = Rq S_in + Oc``. Only that carry is sequential: a loop over the chunk index (ceil(max_seqlen / L)
steps, two batched matmuls each). See README.md for the derivation.

Numerics: the within-chunk factors e^{-Σ log_w} grow like e^{L·max|log_w|}; RWKV-7 has
|log_w| <= e^{-1/2} ≈ 0.61, so with L = 32 they stay below 3e8 (e^{±19}), far from fp32's limits. They
only ever multiply (never add to) their inverses, so the matrix entries themselves stay bounded.
"""

from __future__ import annotations

import torch

from rnnserve.kernels.chunking import Varlen

DEFAULT_CHUNK_SIZE = 32


def wkv7_varlen(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """r, log_w (<= 0), k, a, b [T, H, K]; v [T, H, V]; state [S, H, K, V] fp32: sequence i starts from
    ``state[slot_ids[i]]`` and its final state is written back there; cu_seqlens [B + 1] int32 or the step's
    ``Varlen`` (whose cached chunk layout is used).
    Per token ``S ← diag(e^{log_w}) S + b (aᵀ S) + k vᵀ``, ``o = rᵀ S``. Returns o [T, H, V] fp32."""
    num_tokens, heads, dk = k.shape
    dv = v.shape[-1]
    L = chunk_size
    dev = k.device
    ch = Varlen.of(cu_seqlens).layout(L)
    nc = ch.total

    # Padding is an identity step (log_w = 0, k = v = a = b = r = 0).
    lw, rc, kc, ac, bc = (ch.to_chunks(x).transpose(1, 2) for x in (log_w, r, k, a, b))  # [NC, H, L, K]
    vc = ch.to_chunks(v).transpose(1, 2)  # [NC, H, L, V]

    g_in = lw.cumsum(-2)  # [NC, H, L, K], Σ_{m<=t} log_w_m
    g_ex = g_in - lw  # Σ_{m<t} log_w_m
    g_end = g_in[:, :, -1:]  # [NC, H, 1, K]
    a_t = ac * g_ex.exp()  # ã_t = a_t ⊙ γ_{t-1}
    r_t = rc * g_in.exp()  # r̃_t = r_t ⊙ γ_t
    inv = (-g_in).exp()
    b_h, k_h = bc * inv, kc * inv  # b̂_j = b_j / γ_j, k̂_j = k_j / γ_j

    strict = torch.ones(L, L, dtype=torch.bool, device=dev).tril(-1)
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    m_ab = (a_t @ b_h.transpose(-1, -2)).masked_fill(~strict, 0.0)  # [NC, H, L, L]
    m_ak = (a_t @ k_h.transpose(-1, -2)).masked_fill(~strict, 0.0)
    q_b = (r_t @ b_h.transpose(-1, -2)).masked_fill(~causal, 0.0)
    q_k = (r_t @ k_h.transpose(-1, -2)).masked_fill(~causal, 0.0)

    # u_t = a_tᵀ S_{t-1} (rows of U) solves (I - M_ab) U = Ã S_in + M_ak V: U = W S_in + U_v.
    eye = torch.eye(L, device=dev)
    lower = eye - m_ab
    w_mat = torch.linalg.solve_triangular(lower, a_t, upper=False, unitriangular=True)  # [NC, H, L, K]
    u_v = torch.linalg.solve_triangular(lower, m_ak @ vc, upper=False, unitriangular=True)  # [NC, H, L, V]

    # O = R̃ S_in + Q_b U + Q_k V = Rq S_in + Oc.
    rq = r_t + q_b @ w_mat  # [NC, H, L, K]
    oc = q_b @ u_v + q_k @ vc  # [NC, H, L, V]
    # S_out = diag(γ_L) S_in + Σ_j diag(γ_L / γ_j)(b_j u_j + k_j v_j) = P S_in + Q.
    to_end = (g_end - g_in).exp()  # [NC, H, L, K], γ_L / γ_j <= 1
    b_d, k_d = bc * to_end, kc * to_end
    p_mat = torch.diag_embed(g_end.squeeze(-2).exp()) + b_d.transpose(-1, -2) @ w_mat  # [NC, H, K, K]
    q_mat = b_d.transpose(-1, -2) @ u_v + k_d.transpose(-1, -2) @ vc  # [NC, H, K, V]

    # Carry the state across chunks, batched over the sequences that still have a chunk at index j.
    s_cur = state.index_select(0, slot_ids).float()  # [B, H, K, V]
    s_in = torch.empty(nc, heads, dk, dv, dtype=torch.float32, device=dev)
    for rows, ids in ch.carry_steps():
        prev = s_cur[rows]
        s_in[ids] = prev
        s_cur[rows] = p_mat[ids] @ prev + q_mat[ids]
    state.index_copy_(0, slot_ids, s_cur.to(state.dtype))

    o = (rq @ s_in + oc).transpose(1, 2).reshape(nc * L, heads, dv)  # [NC * L, H, V]
    return ch.from_chunks(o, num_tokens)
