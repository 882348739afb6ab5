"""The CPU prefill GEMM of the Mamba projections, shared by Mamba-1 and Mamba-2.

``cpu`` is the C++ kernel (``linear_prefill``, None where it does not apply: the caller then runs
torch's F.linear); see README.md for the maths and the blocking.
"""
