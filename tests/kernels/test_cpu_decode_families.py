"""The RWKV / RetNet fused decode's projection (``torch.ops.rnnserve_cpu_rnn.linear``: x [M, K] · wᵀ
with the weight row-major or column-major, the threads splitting the output columns) against
``torch.mm``: 1 to 33 rows, widths that do not split evenly into the threads' 16-column blocks, and
strided weights. The whole steps are tested against the torch decode in
tests/engine/test_cpu_decode_families.py."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels import cpu_decode
from rnnserve.kernels.cpu_decode import families

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize(("k", "n"), [(64, 48), (37, 83), (130, 1030)])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_linear_equals_mm(m: int, k: int, n: int, layout: str) -> None:
    ops = families.load()
    assert ops is not None, "the extension did not build (see the log)"
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    if layout == "column-major":
        w = w.t().contiguous().t()
    torch.testing.assert_close(ops.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_linear_reads_a_weight_with_padded_rows() -> None:
    ops = families.load()
    x, w = torch.randn(5, 40), torch.randn(70, 48)[:, :40]  # rows 48 floats apart
    torch.testing.assert_close(ops.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_linear_rejects_mismatched_shapes() -> None:
    ops = families.load()
    with pytest.raises(RuntimeError, match="inner dimensions"):
        ops.linear(torch.randn(2, 8), torch.randn(4, 9))


def test_header_hash_follows_the_header(tmp_path) -> None:
    """torch's loader hashes sources and flags only: the header's content hash is in the flags, so an
    edited panels.h rebuilds the extensions that include it."""
    header = tmp_path / "panels.h"
    header.write_text("// one\n")
    before = cpu_decode.header_flags((header,))
    header.write_text("// two\n")
    after = cpu_decode.header_flags((header,))
    assert before != after
    assert f"-I{tmp_path}" in after
    assert any(f.startswith("-DRNNSERVE_HEADERS_SHA=") for f in cpu_decode.header_flags())
