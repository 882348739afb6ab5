"""panels.h's packed GEMM through every tile shape, on both instruction sets: the AVX-512 tiles (up to
16 rows x one 16-column panel in zmm registers, what runs where the CPU has AVX-512; x read in place up
to 8 rows, interleaved per group above) in this process,
and the AVX2 tiles (up to 5 rows, 8 = 4 + 4) in a child process started with
``RNNSERVE_CPU_DECODE_ISA=avx2``, which the kernels read once per process. Rows 1 to 40 cover every
group split of both (40 = 14 + 13 + 13 rows on AVX-512, eight groups of 5 on AVX2); N = 80 is five
whole panels, N = 83 and 50280 (the Mamba head) end in a part panel; fp32 and int8 panels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnserve.kernels import cpu_decode

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")

ROOT = Path(__file__).resolve().parents[3]
# (K, N): K odd (the one-row kernel's k tail), N whole panels, a part panel, the Mamba head's width.
SHAPES = ((37, 80), (130, 83), (24, 50280))


def has_avx512() -> bool:
    """Whether the CPU has what the AVX-512 tiles need (avx512f/bw/vl/dq), as /proc/cpuinfo says."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


def check_every_tile() -> None:
    """linear_packed against torch for rows 1..40, each shape in SHAPES, fp32 and int8 panels (whichever
    tiles this process runs)."""
    from rnnserve.models.layers import Int8Linear

    ops = cpu_decode.load()
    assert ops is not None, "the extension did not build (see the log)"
    for k, n in SHAPES:
        gen = torch.Generator().manual_seed(k * n)
        w = torch.randn(k, n, generator=gen)
        fp32 = ops.pack_weight(w, True)
        layer = Int8Linear(w.t().contiguous(), None)
        int8 = ops.pack_weight_int8(layer.qweight, layer.scale)
        w_int8 = (layer.qweight.float() * layer.scale[:, None]).t()  # the dequantized weight [K, N]
        x_all = torch.randn(40, k, generator=gen)
        for m in range(1, 41):
            x = x_all[:m]
            for packed, ref_w in ((fp32, w), (int8, w_int8)):
                where = f"M={m} K={k} N={n} {packed.dtype}"
                torch.testing.assert_close(ops.linear_packed(x, packed, n), x @ ref_w, rtol=1e-5, atol=1e-4, msg=where)


def one_row_product(path: str) -> None:
    """Saves one row through a long fp32 panel set (x [1, 1536] · W [1536, 48]) to ``path``: the AVX2 and
    AVX-512 one-row kernels split the k sum over different accumulators, so the bits tell which ran."""
    ops = cpu_decode.load()
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(1, 1536, generator=gen), torch.randn(1536, 48, generator=gen)
    torch.save(ops.linear_packed(x, ops.pack_weight(w, True), 48), path)


def run_child(code: str, isa: str | None) -> None:
    env = dict(os.environ)
    env.pop("RNNSERVE_CPU_DECODE_ISA", None)
    if isa is not None:
        env["RNNSERVE_CPU_DECODE_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_every_tile_equals_mm() -> None:
    """This process's tiles (AVX-512 where the CPU has it)."""
    check_every_tile()


def test_every_avx2_tile_equals_mm() -> None:
    """The AVX2 tiles, forced in a child process."""
    run_child("from tests.kernels.cpu_decode.test_panels import check_every_tile; check_every_tile()", "avx2")


@pytest.mark.skipif(not has_avx512(), reason="the CPU lacks AVX-512: both runs take the AVX2 tiles")
def test_isa_switch_selects_another_kernel(tmp_path: Path) -> None:
    """RNNSERVE_CPU_DECODE_ISA=avx2 does change the kernel (else the AVX2 test above would check the
    AVX-512 tiles twice): the one-row results differ in their last bits, both close to torch."""
    paths = {isa: str(tmp_path / f"{isa}.pt") for isa in ("avx2", "default")}
    for isa, path in paths.items():
        run_child(
            f"from tests.kernels.cpu_decode.test_panels import one_row_product; one_row_product({path!r})",
            "avx2" if isa == "avx2" else None,
        )
    avx2, default = torch.load(paths["avx2"]), torch.load(paths["default"])
    torch.testing.assert_close(avx2, default, rtol=1e-5, atol=1e-4)
    assert not torch.equal(avx2, default)
