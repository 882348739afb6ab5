"""Triton causal conv1d (varlen prefill and decode step) against the sequential reference.

Runs natively on CUDA, in a child process under TRITON_INTERPRET=1 on the CPU (see triton_util)."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.causal_conv1d.naive import causal_conv1d_varlen as conv_naive
from tests.kernels.triton_util import import_triton_module, run_module_under_interpreter, triton_device

DEV = triton_device()
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 2e-3, "rtol": 2e-3}}


@pytest.fixture(scope="module")
def kernels():
    chunk = import_triton_module("rnnserve.kernels.causal_conv1d.chunk_triton")
    recurrent = import_triton_module("rnnserve.kernels.causal_conv1d.recurrent_triton")
    return chunk.causal_conv1d_varlen, recurrent.causal_conv1d_update


def test_under_triton_interpreter() -> None:
    run_module_under_interpreter(__file__)


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(DEV)


def _inputs(total: int, channels: int, width: int, num_slots: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(total, channels, generator=g).to(DEV, dtype)
    w = torch.randn(channels, width, generator=g).to(DEV, dtype)
    b = torch.randn(channels, generator=g).to(DEV, dtype)
    state = torch.randn(num_slots, channels, width - 1, generator=g).to(DEV, dtype)
    return x, w, b, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("lens", "channels", "width", "bias", "activation"),
    [
        ([1], 24, 4, True, "silu"),
        ([63], 40, 4, True, None),
        ([500], 17, 4, False, "silu"),
        ([5, 1, 63, 2, 3], 40, 4, True, "silu"),
        ([3, 1, 9], 8, 2, True, "silu"),
    ],
)
def test_varlen_matches_naive(kernels, lens, channels, width, bias, activation, dtype) -> None:
    varlen, _ = kernels
    x, w, b, state = _inputs(sum(lens), channels, width, 2 * len(lens) + 3, dtype)
    b = b if bias else None
    slots = torch.tensor([2 * i + 3 for i in range(len(lens))][::-1], device=DEV)  # not 0..B-1
    ref_state, tri_state = state.clone(), state.clone()
    ref = conv_naive(x, w, b, ref_state, _cu(lens), slots, activation)
    out = varlen(x, w, b, tri_state, _cu(lens), slots, activation)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(tri_state, ref_state, **TOL[dtype])
    untouched = torch.ones(state.shape[0], dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert torch.equal(tri_state[untouched], state[untouched])


def test_resumed_chunks_equal_one_shot(kernels) -> None:
    """Chunks of 1, 2 (inside the K-1 window) and 20 tokens from a carried state == one shot."""
    varlen, _ = kernels
    x, w, b, state = _inputs(31, 20, 4, 4, torch.float32)
    slot = torch.tensor([2], device=DEV)
    one_state, chunk_state = state.clone(), state.clone()
    one = varlen(x, w, b, one_state, _cu([31]), slot, "silu")
    outs = []
    for lo, hi in [(0, 1), (1, 3), (3, 5), (5, 25), (25, 31)]:
        outs.append(varlen(x[lo:hi], w, b, chunk_state, _cu([hi - lo]), slot, "silu"))
    torch.testing.assert_close(torch.cat(outs), one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk_state, one_state, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("channels", "width", "bias"), [(40, 4, True), (17, 4, False), (8, 2, True)])
def test_update_matches_naive(kernels, channels, width, bias, dtype) -> None:
    _, update = kernels
    x, w, b, state = _inputs(3, channels, width, 6, dtype)
    b = b if bias else None
    slots = torch.tensor([4, 1, 5], device=DEV)
    ref_state, tri_state = state.clone(), state.clone()
    ref = conv_naive(x, w, b, ref_state, _cu([1, 1, 1]), slots, "silu")
    out = update(x, tri_state, w, b, slots, "silu")
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(tri_state, ref_state, **TOL[dtype])


def test_strided_rows(kernels) -> None:
    """x as the models pass it: a column slice of a wider projection output (rows strided)."""
    varlen, update = kernels
    wide, w, b, state = _inputs(9, 48, 4, 4, torch.float32)
    x = wide[:, :24]
    w, ref_state, tri_state = w[:24].contiguous(), state[:, :24].clone(), state[:, :24].clone()
    slots = torch.tensor([2, 1], device=DEV)
    ref = conv_naive(x.contiguous(), w, b[:24], ref_state, _cu([4, 5]), slots, "silu")
    torch.testing.assert_close(varlen(x, w, b[:24], tri_state, _cu([4, 5]), slots, "silu"), ref, atol=1e-5, rtol=1e-5)
    ref = conv_naive(x[:2].contiguous(), w, b[:24], ref_state, _cu([1, 1]), slots, "silu")
    torch.testing.assert_close(update(x[:2], tri_state, w, b[:24], slots, "silu"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri_state, ref_state, atol=1e-6, rtol=1e-6)


def test_update_padding_rows_touch_only_slot_zero(kernels) -> None:
    """CUDA-graph padding: extra rows on slot 0 leave the real rows' outputs and slots as without them."""
    _, update = kernels
    x, w, b, state = _inputs(5, 24, 4, 4, torch.float32)
    real = torch.tensor([3, 1], device=DEV)
    alone_state, padded_state = state.clone(), state.clone()
    alone = update(x[:2], alone_state, w, b, real, "silu")
    padded = update(x, padded_state, w, b, torch.tensor([3, 1, 0, 0, 0], device=DEV), "silu")
    torch.testing.assert_close(padded[:2], alone, atol=0, rtol=0)
    assert torch.equal(padded_state[1:], alone_state[1:])
