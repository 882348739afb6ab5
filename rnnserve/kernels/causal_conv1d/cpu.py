"""The CPU prefill conv: ``cpu.cpp`` (float32, AVX2 + FMA, the item pool of cpu_decode/panels.h), built
by ``torch.utils.cpp_extension`` into torch's extension cache (``make install`` builds it; without a
build the first call starts one in the background, ``kernels.cpu_build``), and the torch conv
(``chunk.py``) where it cannot run.

One pass per (sequence, run of 32 tokens), all channels: each output row is K multiply-adds over input
rows read in place (the cache for the K-1 rows before a sequence), plus the bias and silu; the torch
conv copies the batch into an extended buffer, convolves it and gathers the rows back (several [T, C]
passes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rnnserve.kernels.causal_conv1d import chunk
from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.cpu_build import LazyExtension

_SOURCE = Path(__file__).with_name("cpu.cpp")
_MAX_WIDTH = 8  # cpu.cpp's kMaxK


_EXTENSION = LazyExtension(
    "rnnserve_cpu_causal_conv1d",
    _SOURCE,
    ["-O3", "-mavx2", "-mfma"],
    "rnnserve_cpu_conv",
    "CPU causal-conv1d prefill kernel",
)


def load() -> Any | None:
    """Build (first use) and load the kernel, waiting for it: ``torch.ops.rnnserve_cpu_conv``, or None when it
    cannot."""
    return _EXTENSION.load()


def ready() -> Any | None:
    """The loaded kernel, or None while it builds in the background (see ``kernels.cpu_build``)."""
    return _EXTENSION.ready()


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor) -> bool:
    """Whether cpu.cpp takes these inputs: float32 on the CPU, x with unit column stride, width <= 8."""
    tensors = [x, weight, conv_state] + ([bias] if bias is not None else [])
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and x.stride(-1) == 1
        and 2 <= weight.shape[1] <= _MAX_WIDTH
        and (bias is None or bias.is_contiguous())
    )


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """Same contract as ``chunk.causal_conv1d_varlen``: x [T, C] (a row-strided view is fine), weight
    [C, K], bias [C] | None, conv_state [S, C, K-1] (updated in place), cu_seqlens [B+1] int32 or the
    step's ``Varlen`` (its host copy is read), slot_ids [B] int64 -> y [T, C]."""
    if activation in (None, "silu") and _fits(x, weight, bias, conv_state):
        ops = ready()
        if ops is not None:
            bounds = list(Varlen.of(cu_seqlens).bounds)
            return ops.causal_conv1d_varlen(x, weight, bias, conv_state, bounds, slot_ids.long(), activation == "silu")
    return chunk.causal_conv1d_varlen(x, weight, bias, conv_state, cu_seqlens, slot_ids, activation)
