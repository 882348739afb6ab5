"""linear_recurrence: the chunked prefill and the one-step decode against the sequential reference."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.dispatch import get_kernel
from rnnserve.kernels.linear_recurrence import cpu as linear_recurrence_cpu
from rnnserve.kernels.linear_recurrence import (
    linear_recurrence_naive,
    linear_recurrence_step,
    linear_recurrence_varlen,
)

ATOL = 1e-4
RTOL = 1e-4


def _inputs(lens: list[int], groups: int, heads: int, dk: int, dv: int, num_slots: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, groups, dk, generator=g)
    k = torch.randn(total, groups, dk, generator=g) / dk**0.5
    v = torch.randn(total, heads, dv, generator=g)
    # Decays from strong (e^-3) to nearly none, as Mamba-2's Δ·A and RetNet's log γ produce.
    log_decay = -torch.rand(total, heads, generator=g) * 3.0
    state = torch.randn(num_slots, heads, dk, dv, generator=g)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return q, k, v, log_decay, state, cu


@pytest.mark.parametrize(
    ("lens", "groups", "heads", "chunk_size"),
    [
        ([1], 1, 2, 64),
        ([63], 1, 3, 64),
        ([500], 2, 4, 64),
        ([500], 1, 2, 7),
        ([64, 128], 1, 2, 64),
        ([5, 1, 63, 130, 2], 3, 6, 16),
        ([17, 40], 2, 2, 128),
    ],
)
def test_chunk_matches_naive(lens: list[int], groups: int, heads: int, chunk_size: int) -> None:
    dk, dv = 5, 3
    q, k, v, ld, state, cu = _inputs(lens, groups, heads, dk, dv, num_slots=2 * len(lens) + 3)
    slots = torch.tensor([2 * i + 3 for i in range(len(lens))][::-1])  # not 0..B-1, not increasing
    ref_state, state_chunk = state.clone(), state.clone()
    ref = linear_recurrence_naive(q, k, v, ld, ref_state, cu, slots, scale=0.5)
    out = linear_recurrence_varlen(q, k, v, ld, state_chunk, cu, slots, scale=0.5, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state_chunk, ref_state, atol=ATOL, rtol=RTOL)
    # Slots not in the batch are untouched.
    untouched = torch.ones(state.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(state_chunk[untouched], state[untouched])


@pytest.mark.parametrize("lens", [[1], [63], [500], [1, 63, 500, 64]])
def test_chunk_matches_naive_mamba2_like(lens: list[int]) -> None:
    """Mamba-2's proportions (one group shared by every head, K > V, default chunk size), strong decays
    whose exp underflows (flushed to 0 by the chunked path), resumed states."""
    q, k, v, ld, state, cu = _inputs(lens, 1, 4, 32, 16, num_slots=len(lens) + 1, seed=7)
    ld[::7] *= 40.0  # some tokens decay by down to e^-120: exp(A_i - A_j) underflows within a chunk
    slots = torch.arange(len(lens), 0, -1)
    ref_state, state_chunk = state.clone(), state.clone()
    ref = linear_recurrence_naive(q, k, v, ld, ref_state, cu, slots)
    out = linear_recurrence_varlen(q, k, v, ld, state_chunk, cu, slots)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state_chunk, ref_state, atol=ATOL, rtol=RTOL)


def test_resumed_chunks_equal_one_shot() -> None:
    """Prefilling a prompt in pieces (state carried in the slot) equals prefilling it at once."""
    q, k, v, ld, state, _ = _inputs([300], 2, 4, 8, 4, num_slots=4, seed=1)
    state[2].zero_()
    one_shot = state.clone()
    ref = linear_recurrence_varlen(q, k, v, ld, one_shot, torch.tensor([0, 300], dtype=torch.int32), torch.tensor([2]))
    pieces = []
    for a, b in [(0, 1), (1, 70), (70, 71), (71, 300)]:
        cu = torch.tensor([0, b - a], dtype=torch.int32)
        pieces.append(linear_recurrence_varlen(q[a:b], k[a:b], v[a:b], ld[a:b], state, cu, torch.tensor([2])))
    torch.testing.assert_close(torch.cat(pieces), ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state, one_shot, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("groups", "heads"), [(1, 1), (1, 3), (2, 4), (4, 4)])
def test_step_matches_naive(groups: int, heads: int) -> None:
    """Several decode steps on a batch with slots not 0..B-1 equal the naive loop token by token."""
    bsz, dk, dv, steps = 3, 6, 5, 4
    q, k, v, ld, state, _ = _inputs([bsz * steps], groups, heads, dk, dv, num_slots=8, seed=2)
    slots = torch.tensor([6, 1, 4])
    ref_state, step_state = state.clone(), state.clone()
    for t in range(steps):
        rows = slice(t * bsz, (t + 1) * bsz)
        cu = torch.arange(bsz + 1, dtype=torch.int32)
        ref = linear_recurrence_naive(q[rows], k[rows], v[rows], ld[rows], ref_state, cu, slots, scale=2.0)
        out = linear_recurrence_step(q[rows], k[rows], v[rows], ld[rows], step_state, slots, scale=2.0)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(step_state, ref_state, atol=ATOL, rtol=RTOL)
    assert torch.equal(step_state[[0, 2, 3, 5, 7]], state[[0, 2, 3, 5, 7]])


def test_prefill_then_decode_continues() -> None:
    """Decoding after a chunked prefill continues the same recurrence as the naive loop over all tokens."""
    q, k, v, ld, state, _ = _inputs([70], 1, 2, 4, 4, num_slots=3, seed=3)
    ref_state, state_ours = state.clone(), state.clone()
    slot = torch.tensor([1])
    ref = linear_recurrence_naive(q, k, v, ld, ref_state, torch.tensor([0, 70], dtype=torch.int32), slot)
    out = [linear_recurrence_varlen(q[:65], k[:65], v[:65], ld[:65], state_ours, torch.tensor([0, 65]), slot)]
    out += [
        linear_recurrence_step(q[t : t + 1], k[t : t + 1], v[t : t + 1], ld[t : t + 1], state_ours, slot)
        for t in range(65, 70)
    ]
    torch.testing.assert_close(torch.cat(out), ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state_ours, ref_state, atol=ATOL, rtol=RTOL)


def test_strong_decay_stays_finite() -> None:
    """Cumulative log-decays far below the fp32 exp range in one chunk give no inf or nan."""
    q, k, v, ld, state, cu = _inputs([200], 1, 2, 4, 4, num_slots=2, seed=4)
    ld = ld * 100.0  # down to -300 per token: A_i - A_j reaches -6e4 in a 200-token chunk
    ref_state, state_chunk = state.clone(), state.clone()
    ref = linear_recurrence_naive(q, k, v, ld, ref_state, cu, torch.tensor([1]))
    out = linear_recurrence_varlen(q, k, v, ld, state_chunk, cu, torch.tensor([1]), chunk_size=200)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state_chunk, ref_state, atol=ATOL, rtol=RTOL)


def test_bf16_inputs_fp32_state() -> None:
    """Half-precision inputs: maths in fp32, output in v's dtype, state stays fp32."""
    q, k, v, ld, state, cu = _inputs([40, 9], 1, 2, 8, 8, num_slots=3, seed=5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    slots = torch.tensor([2, 1])
    ref_state, state_chunk = state.clone(), state.clone()
    ref = linear_recurrence_naive(qb.float(), kb.float(), vb.float(), ld, ref_state, cu, slots)
    out = linear_recurrence_varlen(qb, kb, vb, ld, state_chunk, cu, slots, chunk_size=16)
    assert out.dtype == torch.bfloat16 and state_chunk.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(state_chunk, ref_state, atol=ATOL, rtol=RTOL)


def test_heads_not_multiple_of_groups_rejected() -> None:
    q, k, v, ld, state, cu = _inputs([4], 2, 3, 4, 4, num_slots=2)
    with pytest.raises(ValueError, match="multiple"):
        linear_recurrence_varlen(q, k, v, ld, state, cu, torch.tensor([1]))


def test_dispatch_resolves_torch_entries() -> None:
    # The CPU wrapper (the C++ kernel where it runs, chunk.py elsewhere), as for the other prefill ops.
    assert get_kernel("linear_recurrence.chunk", "torch") is linear_recurrence_cpu.linear_recurrence_varlen
    assert get_kernel("linear_recurrence.recurrent", "torch") is linear_recurrence_step
