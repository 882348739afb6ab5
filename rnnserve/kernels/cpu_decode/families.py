"""The fused CPU decode steps of RWKV-4, RWKV-7, RetNet, DenseRetNet and DenseMamba (float32 activations
and state, float32 or int8 weights): ``rwkv_retnet.cpp``, built by ``torch.utils.cpp_extension`` into
torch's extension cache like ``cpu_decode.cpp`` (``make install`` builds both), as its own extension so
that either source builds and loads without the other. Both include ``panels.h`` (the packed weight
panels, their kernels and the thread pool), whose content hash is in the build flags.

``load()`` returns the op namespace ``torch.ops.rnnserve_cpu_rnn`` or None with the reason logged once
(no AVX2, no compiler, a failed build): callers fall back to the torch path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from rnnserve.kernels.cpu_decode import build_extension

_SOURCE = Path(__file__).with_name("rwkv_retnet.cpp")


@functools.cache  # built and loaded once per process; the reason is logged once
def load() -> Any | None:
    """Build (first use) and load the extension; ``torch.ops.rnnserve_cpu_rnn``, or None when it cannot."""
    what = "fused RWKV / RetNet / DenseSSM CPU decode kernels"
    flags = ["-O3", "-mavx2", "-mfma"]
    return build_extension("rnnserve_cpu_decode_rwkv_retnet", _SOURCE, flags, "rnnserve_cpu_rnn", what)
