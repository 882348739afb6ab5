"""Triton scalar-decay linear recurrence (chunked varlen prefill and decode step) against the
sequential reference. Runs natively on CUDA, in a child process under TRITON_INTERPRET=1 on the CPU."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.linear_recurrence.naive import linear_recurrence_naive
from tests.kernels.triton_util import import_triton_module, run_module_under_interpreter, triton_device

DEV = triton_device()
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 5e-3, "rtol": 5e-3}}


def test_under_triton_interpreter() -> None:
    run_module_under_interpreter(__file__)


@pytest.fixture(scope="module")
def kernels():
    chunk = import_triton_module("rnnserve.kernels.linear_recurrence.chunk_triton")
    recurrent = import_triton_module("rnnserve.kernels.linear_recurrence.recurrent_triton")
    return chunk.linear_recurrence_varlen, recurrent.linear_recurrence_step


def _inputs(lens, groups, heads, dk, dv, num_slots, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, groups, dk, generator=g).to(DEV, dtype)
    k = (torch.randn(total, groups, dk, generator=g) / dk**0.5).to(DEV, dtype)
    v = torch.randn(total, heads, dv, generator=g).to(DEV, dtype)
    log_decay = (-torch.rand(total, heads, generator=g) * 3.0).to(DEV)
    state = torch.randn(num_slots, heads, dk, dv, generator=g).to(DEV)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return q, k, v, log_decay, state, cu.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("lens", "groups", "heads", "dk", "dv", "chunk_size"),
    [
        ([1], 1, 2, 5, 3, None),
        ([63], 1, 2, 16, 32, None),
        ([500], 1, 1, 16, 16, None),
        ([5, 1, 63, 40, 2], 2, 4, 5, 3, 16),
        ([33, 17], 3, 6, 8, 20, 7),
    ],
)
def test_varlen_matches_naive(kernels, lens, groups, heads, dk, dv, chunk_size, dtype) -> None:
    varlen, _ = kernels
    q, k, v, ld, state, cu = _inputs(lens, groups, heads, dk, dv, 2 * len(lens) + 3, dtype)
    slots = torch.tensor([2 * i + 3 for i in range(len(lens))][::-1], device=DEV)  # not 0..B-1
    ref_state, tri_state = state.clone(), state.clone()
    ref = linear_recurrence_naive(q, k, v, ld, ref_state, cu, slots, scale=0.5)
    out = varlen(q, k, v, ld, tri_state, cu, slots, scale=0.5, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(tri_state, ref_state, **TOL[torch.float32])
    untouched = torch.ones(state.shape[0], dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert torch.equal(tri_state[untouched], state[untouched])


def test_resumed_chunks_equal_one_shot(kernels) -> None:
    varlen, _ = kernels
    q, k, v, ld, state, cu = _inputs([70], 1, 2, 16, 16, 3, torch.float32)
    slot = torch.tensor([2], device=DEV)
    one_state, chunk_state = state.clone(), state.clone()
    one = varlen(q, k, v, ld, one_state, cu, slot)
    outs = []
    for lo, hi in [(0, 1), (1, 18), (18, 70)]:
        seg_cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEV)
        outs.append(varlen(q[lo:hi], k[lo:hi], v[lo:hi], ld[lo:hi], chunk_state, seg_cu, slot, chunk_size=16))
    torch.testing.assert_close(torch.cat(outs), one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunk_state, one_state, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("groups", "heads", "dk", "dv"), [(1, 2, 5, 3), (2, 4, 16, 64)])
def test_step_matches_naive(kernels, groups, heads, dk, dv, dtype) -> None:
    _, step = kernels
    q, k, v, ld, state, _ = _inputs([1, 1, 1], groups, heads, dk, dv, 6, dtype)
    slots = torch.tensor([4, 1, 5], device=DEV)
    ref_state, tri_state = state.clone(), state.clone()
    cu = torch.arange(4, dtype=torch.int32, device=DEV)
    ref = linear_recurrence_naive(q, k, v, ld, ref_state, cu, slots, scale=0.7)
    out = step(q, k, v, ld, tri_state, slots, scale=0.7)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(tri_state, ref_state, **TOL[torch.float32])


def test_step_padding_rows_touch_only_slot_zero(kernels) -> None:
    _, step = kernels
    q, k, v, ld, state, _ = _inputs([1] * 5, 1, 2, 8, 8, 4, torch.float32)
    alone_state, padded_state = state.clone(), state.clone()
    alone = step(q[:2], k[:2], v[:2], ld[:2], alone_state, torch.tensor([3, 1], device=DEV))
    padded = step(q, k, v, ld, padded_state, torch.tensor([3, 1, 0, 0, 0], device=DEV))
    torch.testing.assert_close(padded[:2], alone, atol=0, rtol=0)
    assert torch.equal(padded_state[1:], alone_state[1:])
