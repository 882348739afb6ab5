"""The fused CPU decode steps of RWKV-4, RWKV-7, RetNet, DenseRetNet and DenseMamba (float32):
``rwkv_retnet.cpp``, built by ``torch.utils.cpp_extension`` into torch's extension cache like
``cpu_decode.cpp`` (``make install`` builds both), as its own extension so that either source builds
and loads without the other. It calls the ``sgemm_`` and ``MKL_Set_Num_Threads_Local`` that torch's
x86 wheels export (MKL); where they are missing the load fails and the torch path serves.

``load()`` returns the op namespace ``torch.ops.rnnserve_cpu_rnn`` or None with the reason logged once
(no AVX2, no compiler, a failed build): callers fall back to the torch path.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from rnnserve.kernels.cpu_decode import unavailable_reason

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("rwkv_retnet.cpp")
_state: dict[str, Any] = {}


def load() -> Any | None:
    """Build (first use) and load the extension; ``torch.ops.rnnserve_cpu_rnn``, or None when it cannot."""
    if "ops" in _state:
        return _state["ops"]
    ops = None
    reason = unavailable_reason()
    if reason is None:
        t0 = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load as build

            build(
                name="rnnserve_cpu_decode_rwkv_retnet",
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-mavx2", "-mfma"],
                is_python_module=False,
                verbose=False,
            )
            ops = torch.ops.rnnserve_cpu_rnn
            logger.info("fused RWKV / RetNet / DenseSSM CPU decode kernels loaded in %.1f s", time.perf_counter() - t0)
        except Exception as exc:  # no compiler or ninja, a failed build: the torch path serves
            reason = f"building {_SOURCE.name} failed: {exc}"
    if ops is None:
        logger.warning("fused CPU decode unavailable, decoding with the torch path: %s", reason)
    _state["ops"] = ops
    return ops
