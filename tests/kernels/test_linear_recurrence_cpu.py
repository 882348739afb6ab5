"""linear_recurrence/cpu.cpp: the C++ SSD prefill kernel against the sequential reference and the torch
chunked path, on odd lengths, varlen batches, resumed states, row-strided views and Mamba-2's Δ / D form."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.linear_recurrence import chunk, cpu, linear_recurrence_naive

ATOL = 1e-4
RTOL = 1e-4

ops = cpu.load()
pytestmark = pytest.mark.skipif(ops is None, reason="the CPU SSD kernel needs AVX-512 and a compiler")


def _inputs(lens: list[int], groups: int, heads: int, dk: int, dv: int, num_slots: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, groups, dk, generator=g)
    k = torch.randn(total, groups, dk, generator=g) / dk**0.5
    v = torch.randn(total, heads, dv, generator=g)
    log_decay = -torch.rand(total, heads, generator=g) * 3.0
    state = torch.randn(num_slots, heads, dk, dv, generator=g)
    bounds = [0, *torch.tensor(lens).cumsum(0).tolist()]
    return q, k, v, log_decay, state, bounds


def _run(q, k, v, v_scale, ld, d, state, bounds, slots, scale=1.0, chunk_size=64):
    return ops.ssd_varlen(q, k, v, v_scale, ld, None, d, state, bounds, slots, scale, chunk_size)


@pytest.mark.parametrize(
    ("lens", "groups", "heads", "dk", "dv", "chunk_size"),
    [
        ([1], 1, 2, 5, 3, 64),
        ([63], 1, 3, 128, 64, 64),
        ([500], 2, 4, 128, 64, 64),
        ([500], 1, 2, 7, 20, 13),  # value dim not a multiple of 16, chunk not a multiple of the row tile
        ([64, 128], 1, 2, 16, 80, 64),  # whole chunks; two column blocks of the tile
        ([5, 1, 63, 130, 2], 3, 6, 9, 17, 16),
        ([0, 17, 0, 40], 2, 2, 32, 64, 64),  # empty sequences
    ],
)
def test_matches_naive(lens: list[int], groups: int, heads: int, dk: int, dv: int, chunk_size: int) -> None:
    q, k, v, ld, state, bounds = _inputs(lens, groups, heads, dk, dv, num_slots=2 * len(lens) + 3)
    slots = torch.tensor([2 * i + 3 for i in range(len(lens))][::-1])  # not 0..B-1, not increasing
    ref_state, state_cpu = state.clone(), state.clone()
    ref = linear_recurrence_naive(q, k, v, ld, ref_state, torch.tensor(bounds), slots, scale=0.5)
    out = _run(q, k, v, None, ld, None, state_cpu, bounds, slots, scale=0.5, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state_cpu, ref_state, atol=ATOL, rtol=RTOL)
    untouched = torch.ones(state.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(state_cpu[untouched], state[untouched])


@pytest.mark.parametrize("lens", [[1], [63], [500], [1, 63, 500, 64]])
def test_mamba2_form_matches_torch_path(lens: list[int]) -> None:
    """v_scale (Δ) and the D skip, q/k/v as column views of one [T, E + 2GN] tensor (Mamba-2's conv
    output), strong decays whose exp underflows, resumed non-zero states: equal to the torch path."""
    heads, dk, dv = 6, 128, 64
    _, _, _, _, state, bounds = _inputs(lens, 1, heads, dk, dv, num_slots=len(lens) + 1, seed=7)
    g = torch.Generator().manual_seed(8)
    t = bounds[-1]
    xbc = torch.randn(t, heads * dv + 2 * dk, generator=g)
    x = xbc[:, : heads * dv].view(t, heads, dv)
    b = xbc[:, heads * dv : heads * dv + dk].view(t, 1, dk)
    c = xbc[:, heads * dv + dk :].view(t, 1, dk)
    dt = torch.rand(t, heads, generator=g) * 0.5
    a = -torch.rand(heads, generator=g) * 4.0
    a[0] = -300.0  # exp(Δ A) underflows within a chunk
    d = torch.randn(heads, generator=g)
    slots = torch.arange(len(lens), 0, -1)
    ref_state, state_cpu = state.clone(), state.clone()
    cu = torch.tensor(bounds, dtype=torch.int32)
    ref = cpu.ssd_varlen_torch(c, b, x, dt, dt * a, d, ref_state, cu, slots)
    out = _run(c, b, x, dt, dt * a, d, state_cpu, bounds, slots)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state_cpu, ref_state, atol=ATOL, rtol=RTOL)
    # The public entry takes the kernel for these inputs and returns the same, also with the log-decay
    # given as Δ ⊙ decay_rate (the kernel forms Δ A itself), and the torch path does too.
    state_entry, state_rate, state_rate_torch = state.clone(), state.clone(), state.clone()
    torch.testing.assert_close(cpu.ssd_varlen(c, b, x, dt, dt * a, d, state_entry, cu, slots), out, atol=0, rtol=0)
    torch.testing.assert_close(state_entry, state_cpu, atol=0, rtol=0)
    rate = cpu.ssd_varlen(c, b, x, dt, None, d, state_rate, cu, slots, decay_rate=a)
    torch.testing.assert_close(rate, out, atol=0, rtol=0)
    torch.testing.assert_close(state_rate, state_cpu, atol=0, rtol=0)
    rate_torch = cpu.ssd_varlen_torch(c, b, x, dt, None, d, state_rate_torch, cu, slots, decay_rate=a)
    torch.testing.assert_close(rate_torch, ref, atol=0, rtol=0)


def test_resumed_pieces_equal_one_shot() -> None:
    """A prompt prefilled in pieces (state carried in the slot) equals one prefill of it."""
    q, k, v, ld, state, _ = _inputs([300], 1, 4, 128, 64, num_slots=4, seed=1)
    state[2].zero_()
    one_shot = state.clone()
    ref = _run(q, k, v, None, ld, None, one_shot, [0, 300], torch.tensor([2]))
    pieces = []
    for a, b in [(0, 1), (1, 70), (70, 71), (71, 300)]:
        pieces.append(_run(q[a:b], k[a:b], v[a:b], None, ld[a:b], None, state, [0, b - a], torch.tensor([2])))
    torch.testing.assert_close(torch.cat(pieces), ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state, one_shot, atol=ATOL, rtol=RTOL)


def test_linear_recurrence_entry_matches_chunk() -> None:
    """RetNet's form (no v_scale, no D, a scale) through the public entry equals chunk.py."""
    q, k, v, ld, state, bounds = _inputs([37, 100], 2, 4, 16, 32, num_slots=3, seed=9)
    slots = torch.tensor([2, 0])
    cu = torch.tensor(bounds, dtype=torch.int32)
    ref_state, state_cpu = state.clone(), state.clone()
    ref = chunk.linear_recurrence_varlen(q, k, v, ld, ref_state, cu, slots, scale=0.25)
    out = cpu.linear_recurrence_varlen(q, k, v, ld, state_cpu, cu, slots, scale=0.25)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state_cpu, ref_state, atol=ATOL, rtol=RTOL)


def test_torch_path_for_what_the_kernel_does_not_take() -> None:
    """bf16 inputs take the torch path: output in v's dtype, state fp32."""
    q, k, v, ld, state, bounds = _inputs([40, 9], 1, 2, 8, 8, num_slots=3, seed=5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    cu = torch.tensor(bounds, dtype=torch.int32)
    slots = torch.tensor([2, 1])
    out = cpu.linear_recurrence_varlen(qb, kb, vb, ld, state, cu, slots)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32


def test_bad_inputs_rejected() -> None:
    q, k, v, ld, state, _ = _inputs([4], 1, 2, 4, 4, num_slots=2)
    with pytest.raises(RuntimeError, match="out of range"):
        _run(q, k, v, None, ld, None, state, [0, 4], torch.tensor([2]))
    with pytest.raises(RuntimeError, match="bounds"):
        _run(q, k, v, None, ld, None, state, [0, 3], torch.tensor([1]))


@pytest.mark.parametrize(("groups", "with_skip"), [(1, True), (2, True), (4, False)])
def test_gated_rms_norm_matches_torch(groups: int, with_skip: bool) -> None:
    """The output tail (D skip, silu gate, per-group RMSNorm, weight) on column views, E not a multiple
    of 16, equals the torch form."""
    from rnnserve.models.layers import gated_rms_norm

    g = torch.Generator().manual_seed(11)
    t, heads, p = 37, 4, 20  # E = 80: groups of 80, 40 and 20 channels
    e = heads * p
    y = torch.randn(t, e, generator=g)
    wide = torch.randn(t, 3 * e, generator=g) * 4.0  # z and x: row-strided column views
    z, x = wide[:, :e], wide[:, 2 * e :]
    w = torch.randn(e, generator=g)
    d = torch.randn(heads, generator=g) if with_skip else None
    skip = y if d is None else torch.addcmul(y, d.repeat_interleave(p), x)
    ref = gated_rms_norm(skip, z, w, 1e-5, groups=groups)
    got = cpu.gated_rms_norm_(y.clone(), z, w, 1e-5, groups, x if with_skip else None, d)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gated_rms_norm_declines_bf16() -> None:
    y = torch.randn(3, 16).bfloat16()
    assert cpu.gated_rms_norm_(y, y, torch.ones(16).bfloat16(), 1e-5, 1) is None


@pytest.mark.parametrize("limit", [(0.0, float("inf")), (0.01, 0.5)])
def test_mamba2_delta_matches_torch(limit: tuple[float, float]) -> None:
    g = torch.Generator().manual_seed(12)
    wide = torch.randn(50, 40, generator=g) * 15.0  # beyond softplus's threshold 20 with the bias
    dt, bias = wide[:, 30:], torch.randn(10, generator=g) * 10.0
    ref = torch.nn.functional.softplus(dt + bias).clamp(*limit)
    torch.testing.assert_close(cpu.mamba2_delta(dt, bias, limit), ref, atol=1e-6, rtol=1e-6)


def test_add_rms_norm_matches_torch() -> None:
    """h += delta in place and the next layer's RMSNorm of it, D not a multiple of 16."""
    g = torch.Generator().manual_seed(13)
    h, delta, w = torch.randn(29, 40, generator=g), torch.randn(29, 40, generator=g), torch.randn(40, generator=g)
    want_h = h + delta
    want = torch.nn.functional.rms_norm(want_h, (40,), w, 1e-5)
    got = cpu.add_rms_norm_(h, delta, w, 1e-5)
    torch.testing.assert_close(h, want_h, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
