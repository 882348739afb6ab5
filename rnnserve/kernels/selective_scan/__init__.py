"""Mamba-1 selective scan with a per-slot fp32 SSM state.

``naive`` is the sequential reference, ``chunk`` the packed varlen prefill (chunked scan),
``recurrent`` the one-token decode step; see README.md for the maths and layouts.
"""
