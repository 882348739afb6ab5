"""The fused CPU decode's GEMMs against ``torch.mm``. The streaming GEMM (``torch.ops.rnnserve_cpu.linear``:
x [M, K] · w [K, N], the layout of a column-major linear weight): 1 to 33 rows, K not a multiple of 4 (the
k tail), N not a multiple of 8 or 16 (the column tails, a thread's last block). The packed GEMM
(``pack_weight`` + ``linear_packed``, what the fused decoders run): the panels' layout, row groups, tails,
1 to 4 threads taking items from the shared counter. The per-layer steps are tested end to end against
the torch decode in tests/engine/test_cpu_decode.py."""

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


@pytest.mark.parametrize("kn", [True, False])
@pytest.mark.parametrize("m", [1, 2, 8, 11, 33])
@pytest.mark.parametrize(("k", "n"), [(64, 48), (37, 83), (130, 1030)])
def test_packed_linear_equals_mm(kn: bool, m: int, k: int, n: int) -> None:
    """The packed panels (``pack_weight`` from [K, N] or [N, K]) through the register-tiled GEMM: one row
    (an odd K leaves the two-k loop a tail), row groups of 2 to 5 (8 = 4 + 4, 11 = 4 + 4 + 3,
    33 = seven groups), N not a multiple of 16 (the last panel's zero columns are not written)."""
    ops = cpu_decode.load()
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    packed = ops.pack_weight(w if kn else w.t().contiguous(), kn)
    assert packed.shape == ((n + 15) // 16, k, 16)
    assert torch.equal(packed.permute(1, 0, 2).reshape(k, -1)[:, :n], w)
    assert not packed.permute(1, 0, 2).reshape(k, -1)[:, n:].any()
    torch.testing.assert_close(ops.linear_packed(x, packed, n), x @ w, rtol=1e-5, atol=1e-5)


def test_packed_linear_rejects_a_panel_set_of_another_shape() -> None:
    ops = cpu_decode.load()
    packed = ops.pack_weight(torch.randn(8, 40), True)  # 3 panels
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.linear_packed(torch.randn(2, 8), packed, 56)  # 56 columns need 4 panels


@pytest.mark.parametrize("threads", [1, 3])
def test_packed_linear_on_several_threads(threads: int) -> None:
    """Many small jobs in a row on the item pool (the caller and threads - 1 workers): every result exact
    to the single-threaded one, so no item is lost, run twice or read before it is written."""
    ops = cpu_decode.load()
    gen = torch.Generator().manual_seed(threads)
    x, w = torch.randn(3, 96, generator=gen), torch.randn(96, 200, generator=gen)
    packed = ops.pack_weight(w, True)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = ops.linear_packed(x, packed, 200)
        torch.set_num_threads(threads)
        for _ in range(200):
            assert torch.equal(ops.linear_packed(x, packed, 200), ref)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("m", [1, 4, 33])
@pytest.mark.parametrize(("k", "n"), [(37, 83), (130, 1030)])
def test_int8_packed_linear_equals_dequantized_mm(m: int, k: int, n: int) -> None:
    """int8 panels (``pack_weight_int8``: an Int8Linear's values and per-channel scales) with fp32
    activations equal x @ (q * scale)ᵀ, the product with the dequantized weight."""
    from rnnserve.models.layers import Int8Linear

    ops = cpu_decode.load()
    gen = torch.Generator().manual_seed(m + k + n)
    layer = Int8Linear(torch.randn(n, k, generator=gen), None)
    packed = ops.pack_weight_int8(layer.qweight, layer.scale)
    assert packed.dtype == torch.int8 and packed.shape == ((n + 15) // 16, k + 4, 16)
    x = torch.randn(m, k, generator=gen)
    ref = x @ (layer.qweight.float() * layer.scale[:, None]).t()
    torch.testing.assert_close(ops.linear_packed(x, packed, n), ref, rtol=1e-5, atol=1e-5)


def test_packed_linear_from_two_python_threads() -> None:
    """Two threads calling the kernels at once (a step while another model is packed, say): the one that
    finds the item pool busy runs its job on its own thread; both results exact."""
    from concurrent.futures import ThreadPoolExecutor

    ops = cpu_decode.load()
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 64, generator=gen), torch.randn(64, 300, generator=gen)
    packed = ops.pack_weight(w, True)
    ref = ops.linear_packed(x, packed, 300)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: [ops.linear_packed(x, packed, 300) for _ in range(100)], range(2)))
    assert all(torch.equal(r, ref) for rs in results for r in rs)
