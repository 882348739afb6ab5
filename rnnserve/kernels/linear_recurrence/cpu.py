"""The CPU chunked prefill of the linear recurrence: ``cpu.cpp`` (float32, AVX-512, the item pool of
cpu_decode/panels.h), built by ``torch.utils.cpp_extension`` into torch's extension cache (without a
build the first call starts one in the background, ``kernels.cpu_build``), and the chunked torch
path (``chunk.py``) where it cannot run: another device or dtype, a CPU without AVX-512, a value dim
the state layout does not fit, or while the build runs.

``ssd_varlen`` is the Mamba-2 form: v_scale (Δ) multiplies v inside the kernel and the D skip is added
to its output, so the mixer never makes Δ x or y + D x as [T, H, P] tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.cpu_build import LazyExtension
from rnnserve.kernels.linear_recurrence import chunk

_SOURCE = Path(__file__).with_name("cpu.cpp")
CHUNK_SIZE = 64  # cpu.cpp's largest (its P and score tiles are [L, L] with L <= 64)

_EXTENSION = LazyExtension(
    "rnnserve_cpu_ssd",
    _SOURCE,
    ["-O3", "-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw"],
    "rnnserve_cpu_ssd",
    "CPU SSD (linear recurrence) prefill kernel",
)


def _cpu_has_avx512() -> bool:
    """cpu.cpp is compiled for AVX-512 throughout, so it is never loaded on a CPU without it."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def load() -> Any | None:
    """Build (first use) and load the kernel, waiting for it: ``torch.ops.rnnserve_cpu_ssd``, or None
    when it cannot (no AVX-512, no compiler)."""
    return _EXTENSION.load() if _cpu_has_avx512() else None


def ready() -> Any | None:
    """The loaded kernel, or None while it builds in the background (see ``kernels.cpu_build``)."""
    return _EXTENSION.ready() if _cpu_has_avx512() else None


def _fits(tensors: list[torch.Tensor | None], state: torch.Tensor) -> bool:
    """Whether cpu.cpp takes these inputs: float32 on the CPU, unit stride along the last dimension,
    a float32 state [S, H, K, V] contiguous within each slot."""
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1):
            return False
    dk, dv = state.shape[2], state.shape[3]
    return (
        state.device.type == "cpu"
        and state.dtype == torch.float32
        and state.stride(3) == 1
        and state.stride(2) == dv
        and state.stride(1) == dk * dv
    )


def ssd_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    v_scale: torch.Tensor | None,
    log_decay: torch.Tensor | None,
    d: torch.Tensor | None,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
    decay_rate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``S_t = exp(log_decay_t) S_{t-1} + k_tᵀ (v_scale_t v_t)``, ``o_t = scale · q_t S_t + d_h v_t``.

    q, k: [T, G, K]; v: [T, H, V]; v_scale: [T, H] or None (1); log_decay: [T, H] (<= 0), or None with
    decay_rate [H] fp32 and v_scale: log_decay = v_scale ⊙ decay_rate (Mamba-2's Δ A, never a tensor
    then); d: [H] fp32 or None (no skip); state [S, H, K, V] fp32, read at slot_ids and the final states written back in
    place; cu_seqlens [B + 1] int32 or the step's ``Varlen``. q, k, v may be row-strided views (the
    columns of Mamba-2's conv output). Returns o [T, H, V]: float32 from the kernel, v's dtype from
    the torch path (as ``chunk.linear_recurrence_varlen``)."""
    if _fits([q, k, v, v_scale, log_decay, decay_rate, d], state):
        ops = ready()
        if ops is not None:
            bounds = list(Varlen.of(cu_seqlens).bounds)
            return ops.ssd_varlen(
                q, k, v, v_scale, log_decay, decay_rate, d, state, bounds, slot_ids.long(), scale, CHUNK_SIZE
            )
    return ssd_varlen_torch(q, k, v, v_scale, log_decay, d, state, cu_seqlens, slot_ids, scale, decay_rate)


def ssd_varlen_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    v_scale: torch.Tensor | None,
    log_decay: torch.Tensor | None,
    d: torch.Tensor | None,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
    decay_rate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ssd_varlen`` through the chunked torch scan (chunk.py): its fallback, and the reference arm of
    scripts/bench_prefill_mamba.py."""
    if log_decay is None:
        if v_scale is None or decay_rate is None:
            raise ValueError("ssd_varlen: without log_decay, v_scale and decay_rate are needed")
        log_decay = v_scale.float() * decay_rate
    x = v if v_scale is None else v.float() * v_scale.float().unsqueeze(-1)
    o = chunk.linear_recurrence_varlen(q, k, x, log_decay, state, cu_seqlens, slot_ids, scale)
    return o if d is None else torch.addcmul(o.float(), d.unsqueeze(-1), v.float()).to(o.dtype)


def linear_recurrence_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Same contract as ``chunk.linear_recurrence_varlen`` (RetNet's retention), through the kernel
    where it fits."""
    return ssd_varlen(q, k, v, None, log_decay, None, state, cu_seqlens, slot_ids, scale).to(v.dtype)


def gated_rms_norm_(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    groups: int,
    x: torch.Tensor | None = None,
    d: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Mamba-2's output tail ``weight ⊙ rms_norm_per_group((y + d x) ⊙ silu(z))`` in place on y [T, E]
    (contiguous float32; z and x [T, E] may be row-strided; d [H] per head of E / H channels, with x, or
    both None), one pass of the kernel; None (y untouched) where it cannot run, for the caller's torch
    form (``models.layers.gated_rms_norm``)."""
    parts = [y, z, weight] if x is None or d is None else [y, z, weight, x, d]
    if y.is_contiguous() and weight.is_contiguous() and (d is None or d.is_contiguous()) and _fits_rows(parts):
        ops = ready()
        if ops is not None:
            return ops.gated_rms_norm_(y, z, weight, eps, groups, x, d)
    return None


def mamba2_delta(dt: torch.Tensor, dt_bias: torch.Tensor, limit: tuple[float, float]) -> torch.Tensor | None:
    """Mamba-2's Δ = clamp(softplus(dt + dt_bias), *limit) [T, H] float32 from in_proj's dt columns [T, H]
    (may be row-strided) through the kernel; None where it cannot run."""
    if _fits_rows([dt, dt_bias]) and dt_bias.is_contiguous():
        ops = ready()
        if ops is not None:
            return ops.mamba2_delta(dt, dt_bias, limit[0], limit[1])
    return None


def add_rms_norm_(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The residual stream between two layers: ``h += delta`` in place, returns the next layer's
    ``rms_norm(h) ⊙ weight`` [T, D] (h, delta contiguous float32), one pass of the kernel; None (h
    untouched) where it cannot run."""
    if h.is_contiguous() and delta.is_contiguous() and weight.is_contiguous() and _fits_rows([h, delta, weight]):
        ops = ready()
        if ops is not None:
            return ops.add_rms_norm_(h, delta, weight, eps)
    return None


def _fits_rows(tensors: list[torch.Tensor]) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)
