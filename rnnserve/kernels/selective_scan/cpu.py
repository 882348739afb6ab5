"""The CPU prefill scan: ``cpu.cpp`` (float32, AVX2 + FMA, the item pool of cpu_decode/panels.h), built
by ``torch.utils.cpp_extension`` into torch's extension cache (``make install`` builds it; without a
build the first call starts one in the background, ``kernels.cpu_build``), and the chunked torch
scan (``chunk.py``) where it cannot run. With AVX-512 and N = 16 the state stays in registers.

One pass per (sequence, block of 64 channels) over the tokens, the block's state in L1: softplus(dt +
dt_bias), exp(Δ A), the update, y = s·C, the D skip and the z gate all in registers, never an
[L, E, N] tensor. The chunked torch scan makes two [L, E, N] buffers and ~40 passes over them.

``linear_prefill``: the prefill GEMM of the same extension (see README.md) for Mamba-1's projections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.cpu_build import LazyExtension
from rnnserve.kernels.selective_scan import chunk

_SOURCE = Path(__file__).with_name("cpu.cpp")
_MAX_STATE = 64  # cpu.cpp's kMaxN: its per-block state arrays are [64, 64] floats


_EXTENSION = LazyExtension(
    "rnnserve_cpu_selective_scan",
    _SOURCE,
    ["-O3", "-mavx2", "-mfma"],
    "rnnserve_cpu_scan",
    "CPU selective-scan prefill kernel",
)


def load() -> Any | None:
    """Build (first use) and load the kernel, waiting for it: ``torch.ops.rnnserve_cpu_scan``, or None when it
    cannot."""
    return _EXTENSION.load()


def ready() -> Any | None:
    """The loaded kernel, or None while it builds in the background (see ``kernels.cpu_build``)."""
    return _EXTENSION.ready()


def _fits(tensors: list[torch.Tensor | None], ssm_state: torch.Tensor, n: int) -> bool:
    """Whether cpu.cpp takes these inputs: float32 on the CPU, unit stride along the last dimension,
    a state of at most 64 per channel in [S, E, N] rows."""
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1):
            return False
    return (
        n <= _MAX_STATE
        and ssm_state.device.type == "cpu"
        and ssm_state.dtype == torch.float32
        and ssm_state.stride(2) == 1
        and ssm_state.stride(1) == n
    )


def selective_scan_varlen(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    dt_softplus: bool = True,
) -> torch.Tensor:
    """Same contract as ``chunk.selective_scan_varlen``: x, dt, z [T, E]; A [E, N]; B, C [T, N]; D,
    dt_bias [E]; ssm_state [S, E, N] fp32 (read at slot_ids, final states written back in place);
    cu_seqlens [B+1] int32 or the step's ``Varlen`` (its host copy is read); slot_ids [B] int64 ->
    y [T, E]. x, dt, z, B and C may be row-strided views (in_proj's and x_proj's column splits)."""
    if x.device.type == "cpu" and _fits([x, dt, A, B, C, D, z, dt_bias], ssm_state, A.shape[1]):
        ops = ready()
        if ops is not None:
            bounds = list(Varlen.of(cu_seqlens).bounds)
            A = A if A.is_contiguous() else A.contiguous()
            return ops.selective_scan_varlen(
                x, dt, A, B, C, D, z, dt_bias, ssm_state, bounds, slot_ids.long(), dt_softplus
            )
    return chunk.selective_scan_varlen(x, dt, A, B, C, D, z, dt_bias, ssm_state, cu_seqlens, slot_ids, dt_softplus)


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
