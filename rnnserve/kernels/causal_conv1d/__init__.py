"""Depthwise causal 1-D convolution with a per-slot cache of the last K-1 inputs (Mamba, Mamba-2).

``naive`` is the sequential reference, ``chunk`` the packed varlen prefill, ``recurrent`` the
one-token decode step; see README.md for the maths and layouts.
"""
