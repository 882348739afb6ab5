"""The RWKV / RetNet fused decode's projections (``torch.ops.rnnserve_cpu_rnn.linear_packed``: x [M, K]
times a weight packed by ``pack_weight`` or ``pack_weight_int8`` into 16-column panels, then the
activation a projection applies as it stores its tile) against ``torch.mm`` on the same (dequantized)
weights: 1 to 47 rows (groups of up to 5 rows per panel), widths that are not multiples of the
16-column panels, row-major and column-major weights. The whole steps are tested against the torch decode in
tests/engine/test_cpu_decode_families.py."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels import cpu_decode
from rnnserve.kernels.cpu_decode import families

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")

POSTS = {
    0: lambda y: y,
    1: torch.tanh,
    2: torch.sigmoid,
    3: torch.nn.functional.silu,
    4: lambda y: torch.relu(y) ** 2,
}


@pytest.mark.parametrize("m", [1, 3, 33, 47])
@pytest.mark.parametrize(("k", "n"), [(64, 48), (37, 83), (130, 1030), (600, 40)])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_linear_packed_equals_mm(m: int, k: int, n: int, layout: str) -> None:
    ops = families.load()
    assert ops is not None, "the extension did not build (see the log)"
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)  # w [out, in]
    packed = ops.pack_weight(w, False) if layout == "row-major" else ops.pack_weight(w.t().contiguous(), True)
    # fp32 sums of k products of N(0, 1) values, in another order than torch.mm's: |error| ~ 1e-6 sqrt(k)
    tol = 1e-5 * k**0.5
    torch.testing.assert_close(ops.linear_packed(x, packed, n, 0), x @ w.t(), rtol=1e-5, atol=tol)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("post", sorted(POSTS))
def test_int8_panels_and_activations(m: int, post: int) -> None:
    """int8 panels: the product with the dequantized weight (q * scale), fp32 activations; each post
    activation as torch computes it (tanh / sigmoid / silu through an exp of relative error ~2e-7)."""
    ops = families.load()
    gen = torch.Generator().manual_seed(m + 10 * post)
    x, w = torch.randn(m, 70, generator=gen), torch.randn(45, 70, generator=gen)
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    ref = POSTS[post](x @ (q.float() * scale[:, None]).t())
    got = ops.linear_packed(x, ops.pack_weight_int8(q, scale), 45, post)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got32 = ops.linear_packed(x, ops.pack_weight(w, False), 45, post)
    torch.testing.assert_close(got32, POSTS[post](x @ w.t()), rtol=1e-5, atol=1e-5)


def test_linear_packed_rejects_a_weight_that_does_not_fit() -> None:
    ops = families.load()
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.linear_packed(torch.randn(2, 8), ops.pack_weight(torch.randn(4, 9), False), 4, 0)


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
