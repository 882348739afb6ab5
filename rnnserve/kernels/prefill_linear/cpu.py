"""The CPU prefill GEMM: ``cpu.cpp`` (float32, AVX-512 tiles and the item pool of cpu_decode/panels.h,
torch's mm without AVX-512), built by ``torch.utils.cpp_extension`` into torch's extension cache (``make
install`` builds it; without a build the first call starts one in the background, ``kernels.cpu_build``).

``linear_prefill`` runs a prefill projection of many rows, optionally with the block's RMS norm fused
into the read of x and the product added into out (a residual update in place): Mamba-1's four
projections (models/mamba.py) and Mamba-2's in_proj and out_proj (models/mamba2.py). See README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rnnserve.kernels.cpu_build import LazyExtension

_SOURCE = Path(__file__).with_name("cpu.cpp")


_EXTENSION = LazyExtension(
    "rnnserve_cpu_prefill_linear",
    _SOURCE,
    ["-O3", "-mavx2", "-mfma"],
    "rnnserve_cpu_prefill_linear",
    "CPU prefill GEMM",
)


def load() -> Any | None:
    """Build (first use) and load the kernel, waiting for it: ``torch.ops.rnnserve_cpu_prefill_linear``, or
    None when it cannot."""
    return _EXTENSION.load()


def ready() -> Any | None:
    """The loaded kernel, or None while it builds in the background (see ``kernels.cpu_build``)."""
    return _EXTENSION.ready()


# Prefill GEMMs (``linear_prefill`` of cpu.cpp): at M = 2048 rows on this Zen 4 CPU, 1 thread, ~1.2-1.5x
# MKL's sgemm (F.linear) on in_proj (768 -> 3072), out_proj (1536 -> 768) and x_proj (1536 -> 80).
# Below _MIN_ROWS rows (decode-sized chunks) F.linear stays.
_MIN_ROWS = 64


def _linear_fits(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None, norm: torch.Tensor | None
) -> bool:
    tensors = [t for t in (x, w, bias, out, norm) if t is not None]
    return (
        x.dim() == 2
        and x.shape[0] >= _MIN_ROWS
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and x.stride(-1) == 1
        and w.t().is_contiguous()  # column-major, as post_load stores CPU weights
        and (out is None or out.stride(-1) == 1)
        and (bias is None or bias.is_contiguous())
        and (norm is None or norm.is_contiguous())
    )


def linear_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor | None:
    """A prefill projection of x [M, K] through the C++ GEMM: ``F.linear(rms_norm(x, norm_weight, eps),
    weight, bias)`` (no norm without norm_weight [K]) for a linear weight [N, K], returned, or written to
    out [M, N] (added to it with accumulate: a residual update in place; out must not overlap x). None,
    with nothing written, where the GEMM does not take these inputs (not all float32 on the CPU, a
    weight not column-major, fewer than ``_MIN_ROWS`` rows) or is not built yet: the caller then runs
    the same maths through torch."""
    if not _linear_fits(x, weight, bias, out, norm_weight):
        return None
    ops = ready()
    if ops is None:
        return None
    if out is None:
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
        accumulate = False
    ops.linear_prefill(x, weight.t(), bias, out, accumulate, norm_weight, eps)
    return out
