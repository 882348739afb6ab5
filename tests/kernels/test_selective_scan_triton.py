"""Triton selective scan (Mamba-1 varlen prefill and decode step) against the sequential reference.
Runs natively on CUDA, in a child process under TRITON_INTERPRET=1 on the CPU."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.selective_scan.naive import selective_scan_varlen as scan_naive
from tests.kernels.triton_util import import_triton_module, run_module_under_interpreter, triton_device

DEV = triton_device()
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 3e-3, "rtol": 3e-3}}


def test_under_triton_interpreter() -> None:
    run_module_under_interpreter(__file__)


@pytest.fixture(scope="module")
def kernels():
    chunk = import_triton_module("rnnserve.kernels.selective_scan.chunk_triton")
    recurrent = import_triton_module("rnnserve.kernels.selective_scan.recurrent_triton")
    return chunk.selective_scan_varlen, recurrent.selective_state_update


def _inputs(total: int, channels: int, nstate: int, num_slots: int, dtype: torch.dtype, seed: int = 0):
    """Mamba-shaped inputs: A = -exp(A_log) < 0 fp32, dt around softplus's knee, fp32 state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(total, channels, generator=g).to(DEV, dtype)
    dt = (torch.randn(total, channels, generator=g) - 2.0).to(DEV, dtype)
    A = -torch.exp(torch.randn(channels, nstate, generator=g)).to(DEV)
    B = torch.randn(total, nstate, generator=g).to(DEV, dtype)
    C = torch.randn(total, nstate, generator=g).to(DEV, dtype)
    D = torch.randn(channels, generator=g).to(DEV)
    z = torch.randn(total, channels, generator=g).to(DEV, dtype)
    dt_bias = (torch.randn(channels, generator=g) * 0.5).to(DEV)
    state = torch.randn(num_slots, channels, nstate, generator=g).to(DEV)
    return x, dt, A, B, C, D, z, dt_bias, state


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(DEV)


# float16 on two shapes only: the interpreter steps every token, and the dtype path is shape-blind.
@pytest.mark.parametrize(
    ("lens", "channels", "nstate", "optional", "dtype"),
    [
        ([1], 8, 4, True, torch.float32),
        ([63], 8, 16, True, torch.float32),
        ([5, 1, 30, 2], 12, 5, True, torch.float32),
        ([7, 3], 16, 8, False, torch.float32),
        ([63], 8, 16, True, torch.float16),
        ([5, 1, 30, 2], 12, 5, True, torch.float16),
    ],
)
def test_varlen_matches_naive(kernels, lens, channels, nstate, optional, dtype) -> None:
    varlen, _ = kernels
    x, dt, A, B, C, D, z, dt_bias, state = _inputs(sum(lens), channels, nstate, 2 * len(lens) + 3, dtype)
    if not optional:
        D = z = dt_bias = None
    slots = torch.tensor([2 * i + 3 for i in range(len(lens))][::-1], device=DEV)  # not 0..B-1
    ref_state, tri_state = state.clone(), state.clone()
    ref = scan_naive(x, dt, A, B, C, D, z, dt_bias, ref_state, _cu(lens), slots, dt_softplus=True)
    out = varlen(x, dt, A, B, C, D, z, dt_bias, tri_state, _cu(lens), slots, dt_softplus=True)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(tri_state, ref_state, **TOL[torch.float32])
    untouched = torch.ones(state.shape[0], dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert torch.equal(tri_state[untouched], state[untouched])


def test_long_sequence(kernels) -> None:
    """500 tokens in one program (the interpreter steps each token), without softplus."""
    varlen, _ = kernels
    x, dt, A, B, C, D, z, _, state = _inputs(500, 4, 4, 2, torch.float32)
    dt = torch.rand_like(dt) * 0.1
    slot = torch.tensor([1], device=DEV)
    ref_state, tri_state = state.clone(), state.clone()
    ref = scan_naive(x, dt, A, B, C, D, z, None, ref_state, _cu([500]), slot, dt_softplus=False)
    out = varlen(x, dt, A, B, C, D, z, None, tri_state, _cu([500]), slot, dt_softplus=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri_state, ref_state, atol=1e-4, rtol=1e-4)


def test_resumed_chunks_equal_one_shot(kernels) -> None:
    varlen, _ = kernels
    x, dt, A, B, C, D, z, dt_bias, state = _inputs(30, 8, 4, 3, torch.float32)
    slot = torch.tensor([2], device=DEV)
    one_state, chunk_state = state.clone(), state.clone()
    one = varlen(x, dt, A, B, C, D, z, dt_bias, one_state, _cu([30]), slot)
    outs = []
    for lo, hi in [(0, 1), (1, 9), (9, 30)]:
        s = slice(lo, hi)
        outs.append(varlen(x[s], dt[s], A, B[s], C[s], D, z[s], dt_bias, chunk_state, _cu([hi - lo]), slot))
    torch.testing.assert_close(torch.cat(outs), one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk_state, one_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("channels", "nstate", "optional"), [(20, 16, True), (12, 5, False)])
def test_update_matches_naive(kernels, channels, nstate, optional, dtype) -> None:
    _, update = kernels
    x, dt, A, B, C, D, z, dt_bias, state = _inputs(3, channels, nstate, 6, dtype)
    if not optional:
        D = z = dt_bias = None
    slots = torch.tensor([4, 1, 5], device=DEV)
    ref_state, tri_state = state.clone(), state.clone()
    ref = scan_naive(x, dt, A, B, C, D, z, dt_bias, ref_state, _cu([1, 1, 1]), slots)
    out = update(tri_state, x, dt, A, B, C, D, z, dt_bias, slots)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(tri_state, ref_state, **TOL[torch.float32])


def test_update_padding_rows_touch_only_slot_zero(kernels) -> None:
    _, update = kernels
    x, dt, A, B, C, D, z, dt_bias, state = _inputs(5, 12, 4, 4, torch.float32)
    alone_state, padded_state = state.clone(), state.clone()
    two = slice(0, 2)
    alone = update(
        alone_state, x[two], dt[two], A, B[two], C[two], D, z[two], dt_bias, torch.tensor([3, 1], device=DEV)
    )
    padded = update(padded_state, x, dt, A, B, C, D, z, dt_bias, torch.tensor([3, 1, 0, 0, 0], device=DEV))
    torch.testing.assert_close(padded[:2], alone, atol=0, rtol=0)
    assert torch.equal(padded_state[1:], alone_state[1:])
