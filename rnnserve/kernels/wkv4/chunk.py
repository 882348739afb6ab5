"""RWKV-4 WKV prefill over a packed variable-length batch: a log-depth parallel scan in log space.

Each token t is the affine map ``s ← e^{w} s + e^{k_t} (v_t, 1)`` on the pair (numerator, denominator).
An element ``(a, b, p)`` stands for "decay by n steps, then add e^p (a, b)"; composing an element with
the d-step element after it gives ``p = max(p1 + d w, p2)``, ``a = e^{p1 + d w - p} a1 + e^{p2 - p} a2``
(likewise b): the same max trick as the recurrence, so nothing overflows. A Hillis-Steele scan applies
it in ceil(log2(max_seqlen)) vectorised steps over all tokens and channels at once; a step never
combines across a sequence boundary. See README.md.
"""

from __future__ import annotations

import torch


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
    cu_seqlens: torch.Tensor,
    slot_ids: torch.Tensor,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """w [C] (= -exp(time_decay)), u [C] (time_first), k, v [T, C]; aa, bb, pp [S, C] fp32: sequence b
    starts from row ``slot_ids[b]`` and its final state is written back there. cu_seqlens [B + 1] int32
    (every sequence at least one token). Returns wkv [T, C] fp32."""
    num_tokens = k.shape[0]
    dev = k.device
    w, u = w.float(), u.float()
    k, v = k.float(), v.float()
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]  # [B]
    if max_seqlen is None:
        max_seqlen = int(lens.max()) if lens.numel() else 0
    seq_of_tok = torch.repeat_interleave(torch.arange(lens.shape[0], device=dev), lens, output_size=num_tokens)  # [T]
    pos = torch.arange(num_tokens, device=dev) - cu[:-1][seq_of_tok]  # [T], position inside its sequence

    # Inclusive scan: after the step with offset d, element t covers tokens [max(start, t - 2d + 1), t].
    a, b, p = v, torch.ones_like(v), k  # [T, C] each
    d = 1
    while d < max_seqlen:
        take = (pos[d:] >= d).unsqueeze(-1)  # [T-d, 1]: the element d back is in the same sequence
        na, nb, np_ = _combine(a[:-d], b[:-d], p[:-d] + d * w, a[d:], b[d:], p[d:])
        a = torch.cat([a[:d], torch.where(take, na, a[d:])])
        b = torch.cat([b[:d], torch.where(take, nb, b[d:])])
        p = torch.cat([p[:d], torch.where(take, np_, p[d:])])
        d *= 2

    a0 = aa.index_select(0, slot_ids).float()  # [B, C]
    b0 = bb.index_select(0, slot_ids).float()
    p0 = pp.index_select(0, slot_ids).float()

    # State before token t: the initial state decayed by pos steps, combined with tokens [start, t-1].
    posf = pos.unsqueeze(-1).float()  # [T, 1]
    first = (pos == 0).unsqueeze(-1)  # [T, 1]
    prev_a = torch.cat([a[:1], a[:-1]])
    prev_b = torch.cat([b[:1], b[:-1]])
    prev_p = torch.cat([p[:1], p[:-1]]).masked_fill(first, float("-inf"))
    sa, sb, sp = _combine(
        a0[seq_of_tok], b0[seq_of_tok], p0[seq_of_tok] + posf * w, prev_a.masked_fill(first, 0.0), prev_b, prev_p
    )

    # wkv_t = (e^{sp} sa + e^{u + k_t} v_t) / (e^{sp} sb + e^{u + k_t}), with the max trick.
    uk = u + k
    q = torch.maximum(sp, uk)
    e1, e2 = torch.exp(sp - q), torch.exp(uk - q)
    out = (e1 * sa + e2 * v) / (e1 * sb + e2)

    # Final state: the initial state decayed by the whole length, combined with all of the sequence.
    last = cu[1:] - 1  # [B]
    fa, fb, fp = _combine(a0, b0, p0 + lens.unsqueeze(-1).float() * w, a[last], b[last], p[last])
    aa.index_copy_(0, slot_ids, fa.to(aa.dtype))
    bb.index_copy_(0, slot_ids, fb.to(bb.dtype))
    pp.index_copy_(0, slot_ids, fp.to(pp.dtype))
    return out
