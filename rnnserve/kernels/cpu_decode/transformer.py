"""The fused CPU decode step of the LLaMA-layout Transformer baseline (float32 activations and KV cache,
float32 or int8 weights in panels.h's packed panels): ``transformer.cpp``, built by
``torch.utils.cpp_extension`` into torch's extension cache like ``cpu_decode.cpp`` (``make install``
builds it), as its own extension so that it builds and loads without the others.

``load()`` returns the op namespace ``torch.ops.rnnserve_cpu_llama`` or None with the reason logged once
(no AVX2, no compiler, a failed build): callers fall back to the torch path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from rnnserve.kernels.cpu_decode import build_extension

_SOURCE = Path(__file__).with_name("transformer.cpp")


@functools.cache  # built and loaded once per process; the reason is logged once
def load() -> Any | None:
    """Build (first use) and load the extension; ``torch.ops.rnnserve_cpu_llama``, or None when it cannot."""
    what = "fused Transformer (LLaMA) CPU decode kernels"
    flags = ["-O3", "-mavx2", "-mfma"]
    return build_extension("rnnserve_cpu_decode_transformer", _SOURCE, flags, "rnnserve_cpu_llama", what)
