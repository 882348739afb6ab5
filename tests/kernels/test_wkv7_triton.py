"""Triton RWKV-7 WKV (varlen prefill and decode step) against the sequential reference.
Runs natively on CUDA, in a child process under TRITON_INTERPRET=1 on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnserve.kernels.wkv7.naive import wkv7_naive
from tests.kernels.triton_util import import_triton_module, run_module_under_interpreter, triton_device

DEV = triton_device()
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-3, "rtol": 2e-3}}


def test_under_triton_interpreter() -> None:
    run_module_under_interpreter(__file__)


@pytest.fixture(scope="module")
def kernels():
    chunk = import_triton_module("rnnserve.kernels.wkv7.chunk_triton")
    recurrent = import_triton_module("rnnserve.kernels.wkv7.recurrent_triton")
    return chunk.wkv7_varlen, recurrent.wkv7_step


def _inputs(total: int, heads: int, dk: int, dv: int, num_slots: int, dtype: torch.dtype, seed: int = 0):
    """RWKV-7-shaped inputs: a = -κ̂, b = κ̂ ⊙ gate with κ̂ unit-norm per head, |log_w| <= e^{-1/2}."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(total, heads, dk, generator=g)
    log_w = -torch.rand(total, heads, dk, generator=g) * 0.6
    k = torch.randn(total, heads, dk, generator=g) / dk**0.5
    v = torch.randn(total, heads, dv, generator=g)
    kappa = F.normalize(torch.randn(total, heads, dk, generator=g), dim=-1)
    a = -kappa
    b = kappa * torch.rand(total, heads, dk, generator=g)
    state = torch.randn(num_slots, heads, dk, dv, generator=g) * 0.1
    inputs = [t.to(DEV, dtype) for t in (r, log_w, k, v, a, b)]
    return (*inputs, state.to(DEV))


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(DEV)


# float16 on two shapes only: the interpreter steps every token, and the dtype path is shape-blind.
@pytest.mark.parametrize(
    ("lens", "heads", "dk", "dv", "dtype"),
    [
        ([1], 2, 8, 8, torch.float32),
        ([63], 1, 16, 16, torch.float32),
        ([5, 1, 30, 2], 2, 5, 3, torch.float32),
        ([9, 17], 2, 16, 20, torch.float32),
        ([63], 1, 16, 16, torch.float16),
        ([5, 1, 30, 2], 2, 5, 3, torch.float16),
    ],
)
def test_varlen_matches_naive(kernels, lens, heads, dk, dv, dtype) -> None:
    varlen, _ = kernels
    r, w, k, v, a, b, state = _inputs(sum(lens), heads, dk, dv, 2 * len(lens) + 3, dtype)
    slots = torch.tensor([2 * i + 3 for i in range(len(lens))][::-1], device=DEV)  # not 0..B-1
    ref_state, tri_state = state.clone(), state.clone()
    ref = wkv7_naive(r, w, k, v, a, b, ref_state, _cu(lens), slots)
    out = varlen(r, w, k, v, a, b, tri_state, _cu(lens), slots)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(tri_state, ref_state, **TOL[torch.float32])
    untouched = torch.ones(state.shape[0], dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert torch.equal(tri_state[untouched], state[untouched])


def test_long_sequence(kernels) -> None:
    """500 tokens in one call == the reference (one program: the interpreter steps each token)."""
    varlen, _ = kernels
    r, w, k, v, a, b, state = _inputs(500, 1, 4, 4, 3, torch.float32)
    slot = torch.tensor([2], device=DEV)
    ref_state, one_state = state.clone(), state.clone()
    ref = wkv7_naive(r, w, k, v, a, b, ref_state, _cu([500]), slot)
    one = varlen(r, w, k, v, a, b, one_state, _cu([500]), slot)
    torch.testing.assert_close(one, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_state, ref_state, atol=1e-4, rtol=1e-4)


def test_resumed_chunks_equal_one_shot(kernels) -> None:
    varlen, _ = kernels
    r, w, k, v, a, b, state = _inputs(40, 1, 8, 8, 3, torch.float32)
    slot = torch.tensor([1], device=DEV)
    one_state, chunk_state = state.clone(), state.clone()
    one = varlen(r, w, k, v, a, b, one_state, _cu([40]), slot)
    outs = []
    for lo, hi in [(0, 1), (1, 10), (10, 40)]:
        seg = [t[lo:hi] for t in (r, w, k, v, a, b)]
        outs.append(varlen(*seg, chunk_state, _cu([hi - lo]), slot))
    torch.testing.assert_close(torch.cat(outs), one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk_state, one_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "dk", "dv"), [(2, 5, 3), (2, 16, 64)])
def test_step_matches_naive(kernels, heads, dk, dv, dtype) -> None:
    _, step = kernels
    r, w, k, v, a, b, state = _inputs(3, heads, dk, dv, 6, dtype)
    slots = torch.tensor([4, 1, 5], device=DEV)
    ref_state, tri_state = state.clone(), state.clone()
    ref = wkv7_naive(r, w, k, v, a, b, ref_state, _cu([1, 1, 1]), slots)
    out = step(r, w, k, v, a, b, tri_state, slots)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(tri_state, ref_state, **TOL[torch.float32])


def test_step_padding_rows_touch_only_slot_zero(kernels) -> None:
    _, step = kernels
    r, w, k, v, a, b, state = _inputs(5, 2, 8, 8, 4, torch.float32)
    alone_state, padded_state = state.clone(), state.clone()
    alone = step(*(t[:2] for t in (r, w, k, v, a, b)), alone_state, torch.tensor([3, 1], device=DEV))
    padded = step(r, w, k, v, a, b, padded_state, torch.tensor([3, 1, 0, 0, 0], device=DEV))
    torch.testing.assert_close(padded[:2], alone, atol=0, rtol=0)
    assert torch.equal(padded_state[1:], alone_state[1:])
