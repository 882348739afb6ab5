"""RWKV-7 WKV: the diagonal-plus-low-rank delta rule ``S ← (diag(w) + b aᵀ) S + k vᵀ``, ``o = rᵀ S``.

See README.md for the maths and the chunked (WY / UT) form.
"""

from rnnserve.kernels.wkv7.chunk import wkv7_varlen
from rnnserve.kernels.wkv7.naive import wkv7_naive
from rnnserve.kernels.wkv7.recurrent import wkv7_step

__all__ = ["wkv7_naive", "wkv7_step", "wkv7_varlen"]
