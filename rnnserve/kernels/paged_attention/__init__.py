"""Attention over a paged KV cache: varlen prefill and one-token decode through block tables.

Keys and values of a sequence live in fixed-size blocks ``[num_blocks, block_size, Hkv, D]``; a
block table maps its logical blocks to physical ones. See README.md.
"""

from rnnserve.kernels.paged_attention.cache import write_kv
from rnnserve.kernels.paged_attention.decode import paged_attention_decode
from rnnserve.kernels.paged_attention.naive import causal_attention_naive, paged_attention_naive
from rnnserve.kernels.paged_attention.prefill import paged_attention_prefill

__all__ = [
    "causal_attention_naive",
    "paged_attention_decode",
    "paged_attention_naive",
    "paged_attention_prefill",
    "write_kv",
]
