"""The gated linear recurrence with a scalar decay per head and token (Mamba-2 SSD, RetNet retention).

``S_t = exp(log_decay_t) S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t``; see README.md.
"""

from rnnserve.kernels.linear_recurrence.chunk import linear_recurrence_varlen
from rnnserve.kernels.linear_recurrence.naive import linear_recurrence_naive
from rnnserve.kernels.linear_recurrence.recurrent import linear_recurrence_step

__all__ = ["linear_recurrence_naive", "linear_recurrence_step", "linear_recurrence_varlen"]
