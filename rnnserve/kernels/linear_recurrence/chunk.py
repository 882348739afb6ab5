"""Chunked (SSD) prefill of the scalar-decay linear recurrence over a packed variable-length batch.

Each sequence is cut into chunks of ``chunk_size`` tokens that never cross a sequence boundary; all
chunks of the batch are gathered into one zero-padded ``[NC, L, ...]`` block so that the work inside
chunks is a handful of batched matrix multiplies. Only the carry of the state from one chunk to the
next is sequential: a loop over chunk index (``ceil(max_seqlen / L)`` steps), batched over sequences.
See README.md for the maths.
"""

from __future__ import annotations

import functools

import torch

from rnnserve.kernels.chunking import ChunkLayout, Varlen
from rnnserve.kernels.linear_recurrence.naive import _check_groups

DEFAULT_CHUNK_SIZE = 64

# exp(x) for x below this is taken as 0 (it is < 2e-35). torch's exp takes a slow path, ten to forty
# times slower, for inputs whose result is denormal or 0 (measured on this Zen 4 CPU), and a chunk's
# decay matrix is mostly such inputs (its upper triangle is -inf), so exponents are clamped here first.
_EXP_FLOOR = -80.0
_EXP_ZERO_BELOW = 2e-35  # > exp(_EXP_FLOOR) = 1.8e-35


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """exp(x) in place for x <= 0 (or -inf), results below 2e-35 set to exactly 0."""
    return torch.threshold_(x.clamp_(min=_EXP_FLOOR).exp_(), _EXP_ZERO_BELOW, 0.0)


@functools.cache
def _segment_sum_matrix(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``sel`` [L, L*L] with sel[m, i*L + j] = 1 where j < m <= i, and ``causal`` [L*L] = 0 where j <= i,
    -inf above the diagonal: ``a @ sel + causal`` is every chunk's seg[i, j] = a_{j+1} + ... + a_i,
    masked, in one matrix multiply."""
    idx = torch.arange(size)
    i, j, m = idx.view(1, -1, 1), idx.view(1, 1, -1), idx.view(-1, 1, 1)
    sel = ((j < m) & (m <= i)).float().reshape(size, size * size)
    causal = torch.zeros(size, size).masked_fill_(idx.view(-1, 1) < idx.view(1, -1), float("-inf")).reshape(-1)
    return sel.to(device), causal.to(device)


def _carry_indices(lay: ChunkLayout, device: torch.device) -> tuple[list, torch.Tensor | slice, torch.Tensor]:
    """Indices into the carried-state buffer X [NC + B, ...], which holds, per sequence b in turn, its
    initial state and then the state at the end of each of its chunks (so chunk c of sequence b starts
    from X[c + b] and ends in X[c + b + 1]). Returns, per chunk index j, (the chunks j of the sequences
    that have one, the X rows they start from) as slices or index tensors; the X rows every chunk starts
    from (a slice when there is one sequence); the X rows of the final states [B]."""
    bsz = len(lay.num_chunks)
    if bsz == 1:
        steps = [(slice(j, j + 1), slice(j, j + 1)) for j in range(lay.num_chunks[0])]
        return steps, slice(0, lay.total), torch.tensor([lay.total], device=device)
    steps = []
    for j in range(max(lay.num_chunks, default=0)):
        live = [b for b in range(bsz) if lay.num_chunks[b] > j]
        chunks = torch.tensor([lay.first_chunk[b] + j for b in live], device=device)
        steps.append((chunks, chunks + torch.tensor(live, device=device)))
    starts = [lay.first_chunk[b] + b + j for b in range(bsz) for j in range(lay.num_chunks[b])]
    ends = [lay.first_chunk[b] + b + lay.num_chunks[b] for b in range(bsz)]
    return steps, torch.tensor(starts, device=device), torch.tensor(ends, device=device)


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
    # When every sequence is a whole number of chunks (a 2048-token prompt, say) the chunks are the
    # packed tokens in order: views, no gather and no scatter back.
    unpadded = nc * L == num_tokens

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        return x.float().view(nc, L, *x.shape[1:]) if unpadded else lay.to_chunks(x)

    qc = to_chunks(q).transpose(1, 2)  # [NC, G, L, K]
    kc = to_chunks(k).transpose(1, 2)  # [NC, G, L, K]
    vl = to_chunks(v).view(nc, L, groups, rep, dv)  # [NC, L, G, R, V]
    # Padding has log-decay 0 (decay 1) and k = v = 0, so it leaves a chunk's carried state unchanged.
    a = to_chunks(log_decay).view(nc, L, groups, rep).permute(0, 2, 3, 1)  # [NC, G, R, L]
    acum = a.cumsum(-1)  # [NC, G, R, L], A_i

    # decay[i, j] = exp(A_i - A_j) for j <= i, 0 above the diagonal. A_i - A_j = a_{j+1} + ... + a_i is
    # summed from the a's themselves, as one matrix multiply with a 0/1 matrix (subtracting the
    # cumulative sums loses all precision when both are large), and the mask is added to the exponent
    # (-inf) before exp: above the diagonal the sum is positive, could overflow, and inf·0 is nan.
    sel, causal = _segment_sum_matrix(L, q.device)
    decay = _exp_(torch.addmm(causal, a.reshape(-1, L), sel)).view(nc, groups, rep, L, L)  # [NC, G, R, L, L]

    # Intra-chunk: o_i = Σ_{j<=i} (q_i·k_j) exp(A_i - A_j) v_j, the scores of a group shared by its R heads.
    scores = torch.matmul(qc, kc.transpose(-1, -2)).unsqueeze(2)  # [NC, G, 1, L, L]
    o_intra = torch.matmul(decay.mul_(scores), vl.permute(0, 2, 3, 1, 4))  # [NC, G, R, L, V]

    # Each chunk's own contribution to the state at its end: Σ_j exp(A_L - A_j) k_jᵀ v_j.
    to_end = _exp_(acum[..., -1:] - acum).permute(0, 3, 1, 2).unsqueeze(-1)  # [NC, L, G, R, 1]
    v_to_end = (vl * to_end).transpose(1, 2).reshape(nc, groups, L, rep * dv)  # [NC, G, L, R*V]
    chunk_kv = torch.matmul(kc.transpose(-1, -2), v_to_end).view(nc, groups, dk, rep, dv)  # [NC, G, K, R, V]
    chunk_decay = _exp_(acum[..., -1].clone()).view(nc, groups, 1, rep, 1)  # [NC, G, 1, R, 1]

    # Carry the state across chunks through X [NC + B, G, K, R, V] (see _carry_indices): X[c + b + 1] =
    # decay_c X[c + b] + kv_c, sequential over the chunk index only, batched over the sequences.
    steps, starts, ends = _carry_indices(lay, q.device)
    xs = torch.empty(nc + bsz, groups, dk, rep, dv, dtype=torch.float32, device=q.device)
    s0 = state.index_select(0, slot_ids).float().view(bsz, groups, rep, dk, dv).transpose(2, 3)
    if bsz == 1:
        xs[0] = s0[0]
        for chunks, rows in steps:
            torch.addcmul(chunk_kv[chunks], chunk_decay[chunks], xs[rows], out=xs[rows.start + 1 : rows.stop + 1])
        s_in = xs[starts]
    else:
        xs.index_copy_(0, starts.new_tensor([lay.first_chunk[b] + b for b in range(bsz)]), s0)
        for chunks, rows in steps:
            kv, dec = chunk_kv.index_select(0, chunks), chunk_decay.index_select(0, chunks)
            xs.index_copy_(0, rows + 1, torch.addcmul(kv, dec, xs.index_select(0, rows)))
        s_in = xs.index_select(0, starts)  # [NC, G, K, R, V]
    final = xs.index_select(0, ends).transpose(2, 3).reshape(bsz, heads, dk, dv)
    state.index_copy_(0, slot_ids, final.to(state.dtype))

    # Inter-chunk: o_i += exp(A_i) q_i S_in.
    o = torch.matmul(qc, s_in.view(nc, groups, dk, rep * dv)).view(nc, groups, L, rep, dv)  # [NC, G, L, R, V]
    o.mul_(_exp_(acum.clone()).transpose(-1, -2).unsqueeze(-1)).add_(o_intra.transpose(2, 3))
    if scale != 1.0:
        o.mul_(scale)
    o = o.transpose(1, 2).reshape(nc * L, heads, dv)  # [NC*L, H, V]
    return (o if unpadded else lay.from_chunks(o, num_tokens)).to(v.dtype)
