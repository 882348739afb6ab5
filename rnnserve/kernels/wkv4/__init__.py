"""RWKV-4 WKV: a per-channel exponentially decayed weighted average of values, kept as (aa, bb, pp).

See README.md for the maths and the max trick that keeps it finite.
"""

from rnnserve.kernels.wkv4.chunk import wkv4_varlen
from rnnserve.kernels.wkv4.naive import wkv4_naive
from rnnserve.kernels.wkv4.recurrent import wkv4_step

__all__ = ["wkv4_naive", "wkv4_step", "wkv4_varlen"]
