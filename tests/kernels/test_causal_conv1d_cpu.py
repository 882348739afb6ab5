"""causal_conv1d.cpu (the C++ prefill conv) against the sequential reference: odd sizes, varlen batches
with empty sequences, short chunks that shift the cache, strided input, the fallback."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.causal_conv1d import chunk, cpu, naive
from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.cpu_decode import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu


def _inputs(lens: list[int], C: int, K: int, S: int = 9, seed: int = 0):
    """x as the first half of a [T, 2C] tensor (the model's in_proj split)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lens), 2 * C, generator=g)[:, :C]
    return x, torch.randn(C, K, generator=g), torch.randn(C, generator=g), torch.randn(S, C, K - 1, generator=g)


@pytest.fixture(scope="module")
def ops():
    ops = cpu.load()
    if ops is None:
        pytest.skip("the CPU conv kernel did not build (see the warning)")
    return ops


@pytest.mark.parametrize("lens", [[1], [63], [500], [5, 0, 1, 2, 63, 3], [2, 1]])
@pytest.mark.parametrize(("C", "K"), [(12, 4), (133, 4), (64, 2), (9, 3)])
@pytest.mark.parametrize("activation", ["silu", None])
def test_matches_naive_varlen(ops, lens: list[int], C: int, K: int, activation: str | None) -> None:
    x, w, b, state = _inputs(lens, C, K)
    slots = torch.tensor([7, 2, 5, 3, 8, 6][: len(lens)], dtype=torch.long)
    ref_state, got_state = state.clone(), state.clone()
    y_ref = naive.causal_conv1d_varlen(x, w, b, ref_state, _cu(lens), slots, activation)
    y = cpu.causal_conv1d_varlen(x, w, b, got_state, Varlen(_cu(lens), _cu(lens).tolist()), slots, activation)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state, ref_state, atol=0, rtol=0)


def test_no_bias_and_split_prompt(ops) -> None:
    """Without a bias; a prompt fed in chunks of 1, 2 and 5 tokens equals one call."""
    x, w, _, state = _inputs([40], 20, 4)
    one = state.clone()
    y_one = cpu.causal_conv1d_varlen(x, w, None, one, _cu([40]), torch.tensor([3]), "silu")
    y_ref = naive.causal_conv1d_varlen(x, w, None, state.clone(), _cu([40]), torch.tensor([3]), "silu")
    torch.testing.assert_close(y_one, y_ref, atol=1e-5, rtol=1e-5)
    for size in (1, 2, 5):
        st = state.clone()
        parts = [
            cpu.causal_conv1d_varlen(
                x[i : i + size], w, None, st, _cu([len(x[i : i + size])]), torch.tensor([3]), "silu"
            )
            for i in range(0, 40, size)
        ]
        torch.testing.assert_close(torch.cat(parts), y_one, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(st, one, atol=0, rtol=0)


def test_other_dtypes_and_a_missing_build_use_the_torch_conv(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = chunk.causal_conv1d_varlen
    monkeypatch.setattr(chunk, "causal_conv1d_varlen", lambda *a, **k: calls.append("chunk") or real(*a, **k))
    x, w, b, state = _inputs([9], 8, 4)
    y = cpu.causal_conv1d_varlen(x.to(torch.bfloat16), w, b, state.clone(), _cu([9]), torch.tensor([2]), "silu")
    assert y.dtype == torch.bfloat16 and calls == ["chunk"]
    monkeypatch.setattr(cpu, "ready", lambda: None)
    cpu.causal_conv1d_varlen(x, w, b, state.clone(), _cu([9]), torch.tensor([2]), "silu")
    assert calls == ["chunk", "chunk"]
