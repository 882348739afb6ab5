"""Triton paged-attention decode: one token per sequence, keys read through the block table.

One program per (sequence, query head) walks its sequence in tiles of BLOCK_N positions (a tile may
span several cache blocks: each position's block is looked up in the table), with an online softmax
(running max m, normaliser l, accumulator acc). The loop bound comes from ``seq_lens`` on the device
and nothing is read back to the host, so the step can be captured in a CUDA graph; padding rows of a
graph batch use block table rows of the padding block and ``seq_len`` 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnserve.kernels.paged_attention.cache import write_kv
from rnnserve.kernels.paged_attention.naive import check_gqa


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, H, D]
    kc_ptr,  # [NB, BS, Hkv, D]
    vc_ptr,  # [NB, BS, Hkv, D]
    bt_ptr,  # [B, max_blocks] int32
    sl_ptr,  # [B] int32
    o_ptr,  # [B, H, D]
    scale,
    GROUP,
    HEAD_DIM,
    BLOCK_SIZE,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_btb,
    stride_ob,
    stride_oh,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq_len = tl.load(sl_ptr + pid_b)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + pid_b * stride_qb + head * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    q = q * scale
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)  # running max (scalar)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)  # running normaliser (scalar)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + offs_n  # [BLOCK_N]
        mask_n = pos < seq_len
        block = tl.load(bt_ptr + pid_b * stride_btb + pos // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        row = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch  # [BLOCK_N]
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(kc_ptr + row[:, None] + offs_d[None, :], mask=mask_nd, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)  # [BLOCK_N]
        s = tl.where(mask_n, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)  # [BLOCK_N]
        v = tl.load(vc_ptr + row[:, None] + offs_d[None, :], mask=mask_nd, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    o = acc / l_i
    tl.store(o_ptr + pid_b * stride_ob + head * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty), mask=mask_d)


def paged_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """Same contract as ``decode.paged_attention_decode``; ``max_seq_len`` is not used (the kernel
    reads each length on the device), so a captured graph stays valid as sequences grow."""
    batch, heads, head_dim = q.shape
    group = check_gqa(heads, k.shape[1])
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    if q.stride(-1) != 1:
        q = q.contiguous()
    o = torch.empty_like(q)
    if batch == 0:
        return o
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share strides and be contiguous in the head dim")
    block_d = triton.next_power_of_2(head_dim)
    block_n = max(16, min(64, 8192 // block_d))
    _paged_decode_kernel[(batch, heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        o,
        float(scale),
        group,
        head_dim,
        k_cache.shape[1],
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        o.stride(0),
        o.stride(1),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return o
