"""The one place that picks a kernel implementation.

Triton on CUDA, the PyTorch path elsewhere (where a C++ CPU prefill kernel exists, the torch entry
is its wrapper, which runs the PyTorch path for what it does not take); ``--kernels torch|triton``
overrides it. Models resolve their functions once at construction (``get_kernel``), never per call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal

import torch

Backend = Literal["torch", "triton"]

# (op, backend) -> "module:function". An op without a Triton entry uses its torch entry. A static
# table: a new op or backend is one line here.
_KERNELS: dict[tuple[str, Backend], str] = {
    # The CPU prefill kernels (C++, float32) fall back to chunk.py elsewhere and when they cannot build.
    ("causal_conv1d.chunk", "torch"): "rnnserve.kernels.causal_conv1d.cpu:causal_conv1d_varlen",
    ("causal_conv1d.recurrent", "torch"): "rnnserve.kernels.causal_conv1d.recurrent:causal_conv1d_update",
    ("selective_scan.chunk", "torch"): "rnnserve.kernels.selective_scan.cpu:selective_scan_varlen",
    ("selective_scan.recurrent", "torch"): "rnnserve.kernels.selective_scan.recurrent:selective_state_update",
    ("linear_recurrence.chunk", "torch"): "rnnserve.kernels.linear_recurrence.cpu:linear_recurrence_varlen",
    ("linear_recurrence.recurrent", "torch"): "rnnserve.kernels.linear_recurrence.recurrent:linear_recurrence_step",
    ("wkv4.chunk", "torch"): "rnnserve.kernels.wkv4.chunk:wkv4_varlen",
    ("wkv4.recurrent", "torch"): "rnnserve.kernels.wkv4.recurrent:wkv4_step",
    ("wkv7.chunk", "torch"): "rnnserve.kernels.wkv7.chunk:wkv7_varlen",
    ("wkv7.recurrent", "torch"): "rnnserve.kernels.wkv7.recurrent:wkv7_step",
    ("paged_attention.prefill", "torch"): "rnnserve.kernels.paged_attention.prefill:paged_attention_prefill",
    ("paged_attention.decode", "torch"): "rnnserve.kernels.paged_attention.decode:paged_attention_decode",
    ("causal_conv1d.chunk", "triton"): "rnnserve.kernels.causal_conv1d.chunk_triton:causal_conv1d_varlen",
    ("causal_conv1d.recurrent", "triton"): "rnnserve.kernels.causal_conv1d.recurrent_triton:causal_conv1d_update",
    ("linear_recurrence.chunk", "triton"): "rnnserve.kernels.linear_recurrence.chunk_triton:linear_recurrence_varlen",
    ("linear_recurrence.recurrent", "triton"): (
        "rnnserve.kernels.linear_recurrence.recurrent_triton:linear_recurrence_step"
    ),
    ("selective_scan.chunk", "triton"): "rnnserve.kernels.selective_scan.chunk_triton:selective_scan_varlen",
    ("selective_scan.recurrent", "triton"): "rnnserve.kernels.selective_scan.recurrent_triton:selective_state_update",
    ("wkv7.chunk", "triton"): "rnnserve.kernels.wkv7.chunk_triton:wkv7_varlen",
    ("wkv7.recurrent", "triton"): "rnnserve.kernels.wkv7.recurrent_triton:wkv7_step",
    ("paged_attention.prefill", "triton"): "rnnserve.kernels.paged_attention.prefill_triton:paged_attention_prefill",
    ("paged_attention.decode", "triton"): "rnnserve.kernels.paged_attention.decode_triton:paged_attention_decode",
}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: torch.device) -> Backend:
    """Map ``auto|torch|triton`` and a device to the backend that will run."""
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError("--kernels triton was requested but the triton package is not installed")
        return "triton"
    if requested != "auto":
        raise ValueError(f"unknown kernel backend {requested!r} (expected auto, torch or triton)")
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def get_kernel(op: str, backend: Backend) -> Callable:
    """The function for ``op`` (e.g. ``"selective_scan.chunk"``) on ``backend``."""
    target = _KERNELS.get((op, backend)) or _KERNELS.get((op, "torch"))
    if target is None:
        raise KeyError(f"no kernel registered for {op!r}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
