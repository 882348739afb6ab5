"""The CPU prefill scan: ``cpu.cpp`` (float32, AVX2 + FMA, the item pool of cpu_decode/panels.h), built
on first use by ``torch.utils.cpp_extension`` into torch's extension cache like the fused decode
kernels (``make install`` builds it), and the chunked torch scan (``chunk.py``) where it cannot run.

One pass per (sequence, block of 64 channels) over the tokens, the block's state in L1: softplus(dt +
dt_bias), exp(Δ A), the update, y = s·C, the D skip and the z gate all in registers, never an
[L, E, N] tensor. The chunked torch scan makes two [L, E, N] buffers and ~40 passes over them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.selective_scan import chunk

_SOURCE = Path(__file__).with_name("cpu.cpp")
_MAX_STATE = 64  # cpu.cpp's kMaxN: its per-block state arrays are [64, 64] floats


@functools.cache  # built and loaded once per process; the reason is logged once
def load() -> Any | None:
    """Build (first use) and load the kernel; ``torch.ops.rnnserve_cpu_scan``, or None when it cannot."""
    from rnnserve.kernels.cpu_decode import build_extension

    flags = ["-O3", "-mavx2", "-mfma"]
    return build_extension(
        "rnnserve_cpu_selective_scan", _SOURCE, flags, "rnnserve_cpu_scan", "CPU selective-scan prefill kernel"
    )


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
        ops = load()
        if ops is not None:
            bounds = list(Varlen.of(cu_seqlens).bounds)
            A = A if A.is_contiguous() else A.contiguous()
            return ops.selective_scan_varlen(
                x, dt, A, B, C, D, z, dt_bias, ssm_state, bounds, slot_ids.long(), dt_softplus
            )
    return chunk.selective_scan_varlen(x, dt, A, B, C, D, z, dt_bias, ssm_state, cu_seqlens, slot_ids, dt_softplus)
