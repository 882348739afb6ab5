"""The fused CPU decode's streaming GEMM (``torch.ops.rnnserve_cpu.linear``: x [M, K] · w [K, N], the
layout of a column-major linear weight) against ``torch.mm``: 1 to 33 rows, K not a multiple of 4 (the
k tail), N not a multiple of 8 or 16 (the column tails, a thread's last block). The per-layer steps are
tested end to end against the torch decode in tests/engine/test_cpu_decode.py."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels import cpu_decode

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")


@pytest.mark.parametrize("m", [1, 3, 7, 33])
@pytest.mark.parametrize(("k", "n"), [(64, 48), (37, 83), (130, 1030)])
def test_linear_equals_mm(m: int, k: int, n: int) -> None:
    ops = cpu_decode.load()
    assert ops is not None, "the extension did not build (see the log)"
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    ref = x @ w
    torch.testing.assert_close(ops.linear(x, w), ref, rtol=1e-5, atol=1e-5)


def test_linear_rejects_mismatched_shapes() -> None:
    ops = cpu_decode.load()
    with pytest.raises(RuntimeError, match="inner dimensions"):
        ops.linear(torch.randn(2, 8), torch.randn(9, 4))
