"""wkv4: the log-depth scan prefill and the one-step decode against the sequential reference, and the
reference against the closed-form weighted average.

The scan is compared with the reference run in float64: it rounds fewer times in a row than the fp32
sequential loop (500 dependent steps), so the fp64 reference is the fair yardstick for both."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.dispatch import get_kernel
from rnnserve.kernels.wkv4 import wkv4_naive, wkv4_step, wkv4_varlen

ATOL = 2e-5
RTOL = 1e-4


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu


def _inputs(total: int, channels: int, key_scale: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.randn(channels, generator=g) * 2)  # decays from ~e^-0.02 to ~e^-50 per step
    u = torch.randn(channels, generator=g)
    k = torch.randn(total, channels, generator=g) * key_scale
    v = torch.randn(total, channels, generator=g)
    return w, u, k, v


def _states(num_slots: int, channels: int, fresh: bool, seed: int = 1):
    if fresh:
        return (
            torch.zeros(num_slots, channels),
            torch.zeros(num_slots, channels),
            torch.full((num_slots, channels), -1e30),
        )
    g = torch.Generator().manual_seed(seed)
    aa = torch.randn(num_slots, channels, generator=g)
    bb = torch.rand(num_slots, channels, generator=g) + 0.1  # a denominator: positive
    pp = torch.randn(num_slots, channels, generator=g) * 5
    return aa, bb, pp


def _clone(states):
    return tuple(s.clone() for s in states)


@pytest.mark.parametrize(
    ("lens", "fresh", "key_scale", "chunk_size"),
    [
        ([1], False, 3.0, 32),
        ([63], True, 3.0, 32),
        ([500], False, 3.0, 32),
        ([500], True, 60.0, 32),  # e^k far beyond fp32 range: only the max trick keeps it finite
        ([500], False, 3.0, 7),
        ([5, 1, 63, 130, 2], False, 3.0, 16),
        ([64, 1, 128], True, 10.0, 64),
    ],
)
def test_chunk_matches_naive(lens: list[int], fresh: bool, key_scale: float, chunk_size: int) -> None:
    channels = 7
    w, u, k, v = _inputs(sum(lens), channels, key_scale)
    num_slots = 2 * len(lens) + 3
    states = _states(num_slots, channels, fresh)
    slots = torch.tensor([2 * i + 3 for i in range(len(lens))][::-1])  # not 0..B-1, not increasing
    ref_st, st = tuple(s.double() for s in states), _clone(states)
    ref = wkv4_naive(w.double(), u.double(), k.double(), v.double(), *ref_st, _cu(lens), slots)
    out = wkv4_varlen(w, u, k, v, *st, _cu(lens), slots, chunk_size=chunk_size)
    assert torch.isfinite(ref).all()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=RTOL)
    for a, b in zip(st, ref_st):
        torch.testing.assert_close(a.double(), b, atol=ATOL, rtol=RTOL)
    untouched = [i for i in range(num_slots) if i not in slots.tolist()]
    for a, b in zip(st, states):
        assert torch.equal(a[untouched], b[untouched])


def test_naive_matches_closed_form() -> None:
    """From a fresh state, wkv_t = (Σ_{j<t} e^{(t-1-j)w + k_j} v_j + e^{u+k_t} v_t) / (same with v = 1)."""
    channels, total = 5, 40
    w, u, k, v = (t.double() for t in _inputs(total, channels, key_scale=2.0))
    w = w.clamp(min=-3.0)  # keep every term representable in the unstabilised sums below
    out = wkv4_naive(
        w, u, k, v, *(s.double() for s in _states(1, channels, fresh=True)), _cu([total]), torch.tensor([0])
    )
    for t in range(total):
        j = torch.arange(t)
        weights = torch.exp((t - 1 - j).double().unsqueeze(-1) * w + k[:t])  # [t, C]
        bonus = torch.exp(u + k[t])
        expected = ((weights * v[:t]).sum(0) + bonus * v[t]) / (weights.sum(0) + bonus)
        torch.testing.assert_close(out[t].double(), expected, atol=1e-10, rtol=1e-10)


def test_resumed_prefill_equals_one_shot() -> None:
    """Prefill in two pieces (the second resuming from the state the first left) == one piece."""
    channels, lens, cut = 6, [70, 33], [40, 1]
    w, u, k, v = _inputs(sum(lens), channels)
    states = _states(6, channels, fresh=True)
    slots = torch.tensor([4, 1])
    whole_st = _clone(states)
    whole = wkv4_varlen(w, u, k, v, *whole_st, _cu(lens), slots)
    first_idx = torch.cat([torch.arange(0, cut[0]), torch.arange(lens[0], lens[0] + cut[1])])
    second_idx = torch.cat([torch.arange(cut[0], lens[0]), torch.arange(lens[0] + cut[1], sum(lens))])
    part_st = _clone(states)
    first = wkv4_varlen(w, u, k[first_idx], v[first_idx], *part_st, _cu(cut), slots)
    rest = [n - c for n, c in zip(lens, cut)]
    second = wkv4_varlen(w, u, k[second_idx], v[second_idx], *part_st, _cu(rest), slots)
    torch.testing.assert_close(whole[first_idx], first, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(whole[second_idx], second, atol=ATOL, rtol=RTOL)
    for a, b in zip(part_st, whole_st):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_step_matches_naive() -> None:
    """Decoding three sequences token by token with the batched in-place step == the reference."""
    channels, steps, bsz = 7, 20, 3
    w, u, k, v = _inputs(steps * bsz, channels, key_scale=20.0)
    k, v = k.view(steps, bsz, channels), v.view(steps, bsz, channels)
    states = _states(8, channels, fresh=False)
    slots = torch.tensor([6, 2, 5])
    st = _clone(states)
    outs = torch.stack([wkv4_step(w, u, k[t], v[t], *st, slots) for t in range(steps)])  # [steps, B, C]
    ref_st = _clone(states)
    # The reference runs each sequence as one packed prompt.
    ref = wkv4_naive(
        w,
        u,
        k.transpose(0, 1).reshape(-1, channels),
        v.transpose(0, 1).reshape(-1, channels),
        *ref_st,
        _cu([steps] * bsz),
        slots,
    )
    torch.testing.assert_close(outs.transpose(0, 1).reshape(-1, channels), ref, atol=ATOL, rtol=RTOL)
    for a, b in zip(st, ref_st):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert torch.equal(st[0][[0, 1, 3, 4, 7]], states[0][[0, 1, 3, 4, 7]])


def test_dispatch() -> None:
    assert get_kernel("wkv4.chunk", "torch") is wkv4_varlen
    assert get_kernel("wkv4.recurrent", "torch") is wkv4_step
