"""The CPU prefill scan: ``cpu.cpp`` (float32, AVX2 + FMA, the item pool of cpu_decode/panels.h), built
by ``torch.utils.cpp_extension`` into torch's extension cache (``make install`` builds it; without a
build the first call starts one in the background, ``kernels.cpu_build``), and the chunked torch
scan (``chunk.py``) where it cannot run. With AVX-512 and N = 16 the state stays in registers.

One pass per (sequence, block of 64 channels) over the tokens, the block's state in L1: softplus(dt +
dt_bias), exp(Δ A), the update, y = s·C, the D skip and the z gate all in registers, never an
[L, E, N] tensor. The chunked torch scan makes two [L, E, N] buffers and ~40 passes over them.
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
