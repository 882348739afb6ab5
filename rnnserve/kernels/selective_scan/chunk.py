"""Varlen selective scan for prefill: a chunked scan over the whole packed batch at once.

The recurrence s_t = a_t ⊙ s_{t-1} + b_t with a_t = exp(Δ_t ⊗ A), b_t = (Δ_t x_t) ⊗ B_t runs over
the packed token stream as if it were one sequence, with two changes at each sequence's first token
f: its slot's initial state is folded in (b_f += a_f ⊙ s0) and a_f = 0, so nothing flows across a
sequence boundary. The stream is cut into blocks (bounding the [L, E, N] working set) and each block
into chunks of ``chunk_size`` tokens:

1. local scans, all chunks in parallel: b_i ← a_i ⊙ b_{i-1} + b_i and the running decay
   a_i ← a_i ⊙ a_{i-1}, for i = 1 .. chunk_size-1 (products of numbers in [0, 1] that may underflow
   to 0, which is the right limit; nothing is ever divided by them);
2. the state entering each chunk, carried chunk to chunk (one small [E, N] op per chunk);
3. s_t = local_t + decay_t ⊙ s_enter, then y_t = s_t · C_t + D x_t, gated by silu(z_t).

Python loops run over chunk offsets and chunks, never over tokens one by one: for a block of L tokens
that is chunk_size + L / chunk_size small ops instead of L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnnserve.kernels.chunking import Varlen

# Working set per block: about this many fp32 elements for each of the two [L, E, N] buffers.
_BLOCK_ELEMENTS = 1 << 21


def selective_scan_varlen(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    dt_softplus: bool = True,
    chunk_size: int = 32,
) -> torch.Tensor:
    """x, dt, z [T, E]; A [E, N] (negative); B, C [T, N]; D, dt_bias [E]; ssm_state [S, E, N] fp32
    (read at slot_ids, final states written back in place); cu_seqlens [B+1] int32 or the step's
    ``Varlen`` (whose host copy is read); slot_ids [B]
    int64 -> y [T, E] in x's dtype."""
    T, E = x.shape
    N = A.shape[1]
    dev = x.device
    A = A.float()
    cu = Varlen.of(cu_seqlens).bounds
    nonempty = [b for b in range(len(cu) - 1) if cu[b + 1] > cu[b]]
    first = [cu[b] for b in nonempty]
    last = [cu[b + 1] - 1 for b in nonempty]
    slots = slot_ids[nonempty] if len(nonempty) < slot_ids.shape[0] else slot_ids
    s0 = ssm_state[slots].float()  # [B', E, N], read before any write

    Lc = chunk_size
    block = max(Lc, (_BLOCK_ELEMENTS // (E * N)) // Lc * Lc)
    block = min(block, -(-T // Lc) * Lc)
    # Two [block, E, N] work buffers, allocated once per call and reused by every block: a fresh large
    # allocation costs a page fault per 4 KiB on first touch, which is as slow as the maths itself.
    a_buf = torch.empty(block, E, N, device=dev)
    b_buf = torch.empty(block, E, N, device=dev)
    y = torch.empty(T, E, dtype=x.dtype, device=dev)
    carry = torch.zeros(E, N, device=dev)  # state after the previous block's last token
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        L = t1 - t0
        nC = -(-L // Lc)
        pad = nC * Lc - L  # identity steps (Δ = 0, b = 0) that round the block up to whole chunks

        delta = dt[t0:t1].float()
        if dt_bias is not None:
            delta = delta + dt_bias
        if dt_softplus:
            delta = F.softplus(delta)  # [L, E]
        xb = x[t0:t1].float()
        Bb = B[t0:t1].float()
        if pad:
            delta = F.pad(delta, (0, 0, 0, pad))
            xb = F.pad(xb, (0, 0, 0, pad))
            Bb = F.pad(Bb, (0, 0, 0, pad))

        a = torch.mul(delta.unsqueeze(-1), A, out=a_buf[: nC * Lc]).exp_()  # [nC*Lc, E, N], in (0, 1]
        b = torch.mul((delta * xb).unsqueeze(-1), Bb.unsqueeze(1), out=b_buf[: nC * Lc])  # [nC*Lc, E, N]
        local_first = [(f - t0, i) for i, f in enumerate(first) if t0 <= f < t1]
        if local_first:
            rows = torch.tensor([r for r, _ in local_first], device=dev)
            seqs = torch.tensor([i for _, i in local_first], device=dev)
            b[rows] += a[rows] * s0[seqs]
            a[rows] = 0.0

        # Local scans of all chunks at once; a becomes the decay from the chunk's start (a running
        # product of factors in [0, 1]: it underflows towards 0, never overflows, and is exactly 0
        # from a sequence's first token on, which cuts the carry from before it).
        av = a.view(nC, Lc, E, N)
        bv = b.view(nC, Lc, E, N)
        for i in range(1, Lc):
            bv[:, i].addcmul_(av[:, i], bv[:, i - 1])
            av[:, i].mul_(av[:, i - 1])

        enter = torch.empty(nC, E, N, device=dev)
        for c in range(nC):
            enter[c] = carry
            carry = torch.addcmul(bv[c, -1], av[c, -1], carry)
        bv.addcmul_(av, enter.unsqueeze(1))  # every token's state [nC, Lc, E, N]

        states = b[:L]  # [L, E, N]
        out = torch.bmm(states, C[t0:t1].float().unsqueeze(-1)).squeeze(-1)  # [L, E]
        if D is not None:
            out.addcmul_(xb[:L], D)
        if z is not None:
            out.mul_(F.silu(z[t0:t1].float()))
        y[t0:t1] = out

        local_last = [(l - t0, i) for i, l in enumerate(last) if t0 <= l < t1]
        if local_last:
            rows = torch.tensor([r for r, _ in local_last], device=dev)
            seqs = torch.tensor([i for _, i in local_last], device=dev)
            ssm_state[slots[seqs]] = states[rows].to(ssm_state.dtype)
    return y
