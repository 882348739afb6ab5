"""prefill_linear.cpu (the C++ prefill GEMM of the Mamba projections) against torch's F.linear, with and
without the fused RMS norm, returned, written and accumulated; where it declines, and before its build."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.cpu_decode import unavailable_reason
from rnnserve.kernels.prefill_linear import cpu

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")


@pytest.fixture(scope="module")
def ops():
    ops = cpu.load()
    if ops is None:
        pytest.skip("the CPU prefill GEMM did not build (see the warning)")
    return ops


def _linear_case(M: int, K: int, N: int, bias: bool, seed: int = 0):
    """x as the first K columns of a [M, K + 5] tensor (row-strided), a column-major weight [N, K] (as
    post_load stores it), bias [N] or None, norm weight [K]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K + 5, generator=g)[:, :K]
    w = torch.randn(K, N, generator=g).t() / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    return x, w, b, torch.rand(K, generator=g) + 0.5


@pytest.mark.parametrize(
    ("M", "K", "N"), [(64, 48, 256), (500, 133, 300), (64, 300, 256), (77, 768, 1040), (101, 300, 80), (64, 48, 5)]
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("norm", [True, False])
def test_linear_prefill_matches_torch(ops, M: int, K: int, N: int, bias: bool, norm: bool) -> None:
    """Odd row counts (groups of 8..16 rows; of 8 and a tail for the narrow outputs 80 and 5), output
    widths past a 16-column panel (masked tail), depths past a 256-deep partial sum (300, 768), with and
    without the bias and the fused RMS norm; returned, written, and added into a strided out."""
    x, w, b, nw = _linear_case(M, K, N, bias)
    eps = 1e-5
    xn = torch.nn.functional.rms_norm(x, (K,), nw, eps) if norm else x
    want = torch.nn.functional.linear(xn, w, b)
    kw = {"norm_weight": nw, "eps": eps} if norm else {}
    got = cpu.linear_prefill(x, w, b, **kw)
    assert got is not None
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    base = torch.randn(M, N + 3)
    out = base.clone()[:, :N]
    assert cpu.linear_prefill(x, w, b, out=out, **kw) is out
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    out = base.clone()[:, :N]
    assert cpu.linear_prefill(x, w, b, out=out, accumulate=True, **kw) is out
    torch.testing.assert_close(out, base[:, :N] + want, atol=1e-4, rtol=1e-4)


def test_linear_prefill_declines(ops) -> None:
    """None, nothing written, where the GEMM does not apply: too few rows, a row-major weight, float64."""
    x, w, b, _ = _linear_case(100, 40, 300, True)
    out = torch.zeros(100, 300)
    assert cpu.linear_prefill(x[:63], w, b) is None
    assert cpu.linear_prefill(x, w.contiguous(), b, out=out) is None
    assert cpu.linear_prefill(x.double(), w.double(), b.double()) is None
    assert not out.any()
    assert cpu.linear_prefill(x, w, b) is not None


def test_linear_prefill_none_before_the_build(ops, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the extension is not ready (building in the background) it returns None, nothing written."""
    x, w, b, _ = _linear_case(100, 40, 300, True)
    out = torch.zeros(100, 300)
    monkeypatch.setattr(cpu, "ready", lambda: None)
    assert cpu.linear_prefill(x, w, b, out=out) is None
    assert not out.any()
