"""wkv7: the chunked (WY form) prefill and the one-step decode against the sequential reference, and
the reference against the ``rwkv`` package's own update written in its [V, K] state layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnserve.kernels.dispatch import get_kernel
from rnnserve.kernels.wkv7 import wkv7_naive, wkv7_step, wkv7_varlen

ATOL = 2e-5
RTOL = 1e-4
HEADS, DK, DV = 2, 6, 5


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu


def _inputs(total: int, seed: int = 0, dk: int = DK, dv: int = DV):
    """RWKV-7-shaped inputs: log decays in (-e^-0.5, 0), a = -κ and b = κ ⊙ gate with κ unit per head."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(total, HEADS, dk, generator=g)
    k = torch.randn(total, HEADS, dk, generator=g) / dk**0.5
    v = torch.randn(total, HEADS, dv, generator=g)
    log_w = -0.6065 * torch.sigmoid(torch.randn(total, HEADS, dk, generator=g) * 3)
    kappa = F.normalize(torch.randn(total, HEADS, dk, generator=g), dim=-1)
    gate = torch.sigmoid(torch.randn(total, HEADS, dk, generator=g) * 2)
    return r, log_w, k, v, -kappa, kappa * gate


def _state(num_slots: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(num_slots, HEADS, DK, DV, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("lens", "chunk_size"),
    [
        ([1], 16),
        ([63], 16),
        ([500], 32),
        ([500], 64),
        ([63], 7),
        ([5, 1, 63, 130, 2], 16),
        ([16, 32, 17], 16),
    ],
)
def test_chunk_matches_naive(lens: list[int], chunk_size: int) -> None:
    inputs = _inputs(sum(lens))
    num_slots = 2 * len(lens) + 3
    state = _state(num_slots)
    slots = torch.tensor([2 * i + 3 for i in range(len(lens))][::-1])  # not 0..B-1, not increasing
    ref_state, st = state.double(), state.clone()
    ref = wkv7_naive(*(x.double() for x in inputs), ref_state, _cu(lens), slots)
    out = wkv7_varlen(*inputs, st, _cu(lens), slots, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(st.double(), ref_state, atol=ATOL, rtol=RTOL)
    untouched = [i for i in range(num_slots) if i not in slots.tolist()]
    assert torch.equal(st[untouched], state[untouched])


def test_naive_matches_package_update() -> None:
    """The ``rwkv`` package's step on its [H, V, K] state: S ← S diag(w) + S (a bᵀ) + v kᵀ, o = S r."""
    total = 30
    r, log_w, k, v, a, b = (x.double() for x in _inputs(total, dk=DK, dv=DK))
    s0 = torch.randn(HEADS, DK, DK, dtype=torch.float64)
    state = s0.unsqueeze(0).clone()
    ours = wkv7_naive(r, log_w, k, v, a, b, state, _cu([total]), torch.tensor([0]))
    s = s0.transpose(-1, -2).clone()  # [H, V, K]
    for t in range(total):
        ab = a[t].unsqueeze(-1) @ b[t].unsqueeze(-2)  # [H, K, K]
        s = s * log_w[t].exp().unsqueeze(-2) + s @ ab + v[t].unsqueeze(-1) @ k[t].unsqueeze(-2)
        torch.testing.assert_close(ours[t], (s @ r[t].unsqueeze(-1)).squeeze(-1), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state[0], s.transpose(-1, -2), atol=1e-10, rtol=1e-10)


def test_resumed_prefill_equals_one_shot() -> None:
    """Prefill in two pieces (the second resuming from the state the first left) == one piece."""
    lens, cut = [70, 33], [40, 1]
    inputs = _inputs(sum(lens))
    state = _state(6)
    slots = torch.tensor([4, 1])
    whole_state = state.clone()
    whole = wkv7_varlen(*inputs, whole_state, _cu(lens), slots)
    first_idx = torch.cat([torch.arange(0, cut[0]), torch.arange(lens[0], lens[0] + cut[1])])
    second_idx = torch.cat([torch.arange(cut[0], lens[0]), torch.arange(lens[0] + cut[1], sum(lens))])
    part_state = state.clone()
    first = wkv7_varlen(*(x[first_idx] for x in inputs), part_state, _cu(cut), slots)
    second = wkv7_varlen(*(x[second_idx] for x in inputs), part_state, _cu([n - c for n, c in zip(lens, cut)]), slots)
    torch.testing.assert_close(whole[first_idx], first, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(whole[second_idx], second, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(part_state, whole_state, atol=ATOL, rtol=RTOL)


def test_step_matches_naive() -> None:
    """Decoding three sequences token by token with the batched in-place step == the reference."""
    steps, bsz = 20, 3
    inputs = _inputs(steps * bsz)
    state = _state(8)
    slots = torch.tensor([6, 2, 5])
    st = state.clone()
    per_step = [x.view(steps, bsz, *x.shape[1:]) for x in inputs]  # token t of sequence i at [t, i]
    outs = torch.stack([wkv7_step(*(x[t] for x in per_step), st, slots) for t in range(steps)])  # [steps, B, H, V]
    ref_state = state.clone()
    packed = [x.transpose(0, 1).reshape(steps * bsz, *x.shape[2:]) for x in per_step]  # sequence-major
    ref = wkv7_naive(*packed, ref_state, _cu([steps] * bsz), slots)
    torch.testing.assert_close(outs.transpose(0, 1).reshape(steps * bsz, HEADS, DV), ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(st, ref_state, atol=ATOL, rtol=RTOL)
    assert torch.equal(st[[0, 1, 3, 4, 7]], state[[0, 1, 3, 4, 7]])


def test_dispatch() -> None:
    assert get_kernel("wkv7.chunk", "torch") is wkv7_varlen
    assert get_kernel("wkv7.recurrent", "torch") is wkv7_step
