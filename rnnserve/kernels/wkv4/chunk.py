"""RWKV-4 WKV prefill over a packed variable-length batch, in chunked form.

Every sequence is cut into chunks of ``chunk_size`` tokens (never crossing a sequence boundary) and all
chunks of the batch are gathered into one ``[NC, L, C]`` block. Three vectorised passes:

1. inside every chunk at once, the recurrence from an empty state: a loop over the L positions of a
   chunk, each step on ``[NC, C]`` (the max-trick update of the reference);
2. the carry of each sequence's state from chunk to chunk: a loop over the chunk index, each step
   combining the decayed carry with a chunk's local end state, batched over sequences;
3. every output at once, from the carry decayed by the token's offset, the local state before the
   token and the token's own bonus term.

So a prompt of T tokens takes L + ceil(T / L) small vectorised steps (96 for T = 2048, L = 32), not T.
Combining two partial states uses the same max trick as the recurrence, so nothing overflows. See
README.md.
"""

from __future__ import annotations

import torch

from rnnserve.kernels.chunking import Varlen

DEFAULT_CHUNK_SIZE = 32
# Exponent of an empty partial state (the recurrence's fresh ``pp``): e^{EMPTY - anything real} = 0.
_EMPTY = -1e30


def _combine(
    a1: torch.Tensor, b1: torch.Tensor, p1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, p2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e^{p1}(a1, b1) + e^{p2}(a2, b2) as (a, b, p) with p = max(p1, p2); p1 already carries its decay."""
    p = torch.maximum(p1, p2)
    e1, e2 = torch.exp(p1 - p), torch.exp(p2 - p)
    return e1 * a1 + e2 * a2, e1 * b1 + e2 * b2, p


def wkv4_varlen(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    aa: torch.Tensor,
    bb: torch.Tensor,
    pp: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """w [C] (= -exp(time_decay)), u [C] (time_first), k, v [T, C]; aa, bb, pp [S, C] fp32: sequence i
    starts from row ``slot_ids[i]`` and its final state is written back there. cu_seqlens [B + 1] int32
    or the step's ``Varlen`` (every sequence at least one token; the chunk layout is the Varlen's, built
    from host ints once per step). Returns wkv [T, C] fp32."""
    num_tokens, channels = k.shape
    L = chunk_size
    dev = k.device
    w, u = w.float(), u.float()
    ch = Varlen.of(cu_seqlens).layout(L)
    nc = ch.total

    # Padding (after the last token of a sequence) adds nothing: e^{k} = 0, v = 0.
    kc, vc = ch.to_chunks(k, pad=_EMPTY), ch.to_chunks(v)  # [NC, L, C]

    # 1. Local states inside every chunk, from empty: la/lb/lp[:, i] is the state before position i,
    # [:, L] the state after the last position.
    la = torch.empty(nc, L + 1, channels, dtype=torch.float32, device=dev)
    lb, lp = torch.empty_like(la), torch.empty_like(la)
    la[:, 0], lb[:, 0], lp[:, 0] = 0.0, 0.0, _EMPTY
    ones = torch.ones(nc, channels, dtype=torch.float32, device=dev)
    for i in range(L):
        la[:, i + 1], lb[:, i + 1], lp[:, i + 1] = _combine(la[:, i], lb[:, i], lp[:, i] + w, vc[:, i], ones, kc[:, i])

    # 2. Carry across chunks. A chunk's local end is its state after its last real token.
    last = ch.valid.view(nc, 1, 1).expand(nc, 1, channels)
    end_a, end_b, end_p = (x.gather(1, last).squeeze(1) for x in (la, lb, lp))  # [NC, C]
    span = ch.valid.unsqueeze(-1).float() * w  # [NC, C], decay across a chunk's real tokens
    ca = aa.index_select(0, slot_ids).float()  # [B, C]
    cb = bb.index_select(0, slot_ids).float()
    cp = pp.index_select(0, slot_ids).float()
    in_a, in_b, in_p = (torch.empty(nc, channels, dtype=torch.float32, device=dev) for _ in range(3))
    for rows, ids in ch.carry_steps():
        pa, pb, pq = ca[rows], cb[rows], cp[rows]
        in_a[ids], in_b[ids], in_p[ids] = pa, pb, pq
        na, nb, np_ = _combine(pa, pb, pq + span[ids], end_a[ids], end_b[ids], end_p[ids])
        ca[rows], cb[rows], cp[rows] = na, nb, np_
    aa.index_copy_(0, slot_ids, ca.to(aa.dtype))
    bb.index_copy_(0, slot_ids, cb.to(bb.dtype))
    pp.index_copy_(0, slot_ids, cp.to(pp.dtype))

    # 3. Outputs. Before token i of a chunk the state is the carry decayed by i steps plus the local
    # state before i; the token itself enters with the bonus u. One three-way max trick:
    # wkv = (e^{p_c} a_c + e^{p_l} a_l + e^{u+k} v) / (e^{p_c} b_c + e^{p_l} b_l + e^{u+k}).
    p_c = in_p.unsqueeze(1) + torch.arange(L, device=dev, dtype=torch.float32).view(1, L, 1) * w  # [NC, L, C]
    p_l = lp[:, :L]
    uk = u + kc
    q = torch.maximum(torch.maximum(p_c, p_l), uk)
    e_c, e_l, e_b = torch.exp(p_c - q), torch.exp(p_l - q), torch.exp(uk - q)
    num = e_c * in_a.unsqueeze(1) + e_l * la[:, :L] + e_b * vc
    den = e_c * in_b.unsqueeze(1) + e_l * lb[:, :L] + e_b
    return ch.from_chunks((num / den).view(nc * L, channels), num_tokens)
