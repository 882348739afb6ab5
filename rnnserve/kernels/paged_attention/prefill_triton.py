"""Triton varlen prefill through block tables (flash-attention style, online softmax).

One program per (sequence, tile of BLOCK_M queries, query head). The new keys and values are
written into the cache first, so every key tile, prefix or new, is read the same way: position p
from block ``block_tables[b, p // block_size]``. Tiles lie wholly after the tile's last query are
skipped (causality); positions past ``seq_len`` and after each query are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnserve.kernels.paged_attention.cache import write_kv
from rnnserve.kernels.paged_attention.naive import check_gqa


@triton.jit
def _paged_prefill_kernel(
    q_ptr,  # [T, H, D]
    kc_ptr,  # [NB, BS, Hkv, D]
    vc_ptr,  # [NB, BS, Hkv, D]
    cu_ptr,  # [B+1] int32
    sl_ptr,  # [B] int32
    bt_ptr,  # [B, max_blocks] int32
    o_ptr,  # [T, H, D]
    scale,
    GROUP,
    HEAD_DIM,
    BLOCK_SIZE,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_btb,
    stride_ot,
    stride_oh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    start = tl.load(cu_ptr + pid_b).to(tl.int64)
    q_len = tl.load(cu_ptr + pid_b + 1).to(tl.int64) - start
    if pid_m * BLOCK_M >= q_len:
        return
    seq_len = tl.load(sl_ptr + pid_b).to(tl.int64)
    ctx = seq_len - q_len
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index within the chunk
    mask_m = offs_m < q_len
    q_pos = ctx + offs_m  # absolute positions
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(
        q_ptr + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys up to the tile's last query (causal), never past the sequence.
    kv_end = tl.minimum(ctx + (pid_m + 1) * BLOCK_M, seq_len)
    for k0 in range(0, kv_end, BLOCK_N):
        pos = k0 + offs_n  # [BLOCK_N]
        mask_n = pos < kv_end
        block = tl.load(bt_ptr + pid_b * stride_btb + pos // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        row = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch  # [BLOCK_N]
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(kc_ptr + row[:, None] + offs_d[None, :], mask=mask_nd, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32
        causal = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
        s = tl.where(causal, s, float("-inf"))
        # Every row sees key 0 (q_pos >= 0), so after the first tile m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(vc_ptr + row[:, None] + offs_d[None, :], mask=mask_nd, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(
        o_ptr + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def paged_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
) -> torch.Tensor:
    """Same contract as ``prefill.paged_attention_prefill`` (``max_seq_len`` unused here)."""
    total, heads, head_dim = q.shape
    group = check_gqa(heads, k.shape[1])
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    if q.stride(-1) != 1:
        q = q.contiguous()
    o = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if total == 0 or batch == 0:
        return o
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share strides and be contiguous in the head dim")
    # tl.dot needs every dim >= 16.
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = 64 if block_d <= 64 else 32
    block_n = 32
    grid = (batch, triton.cdiv(max_query_len, block_m), heads)
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        cu_seqlens,
        seq_lens,
        block_tables,
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
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        # fp32 models get exact fp32 products; half-precision inputs already carry more error than tf32.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return o
