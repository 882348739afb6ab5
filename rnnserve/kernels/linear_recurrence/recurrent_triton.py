"""Triton one-token scalar-decay linear recurrence step, in place by slot index.

One program per (sequence, head, block of value columns): ``S ← exp(log_decay) S + kᵀ v``,
``o = scale · q S``, the state slice read once and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnserve.kernels.linear_recurrence.chunk_triton import _last_dim_contiguous
from rnnserve.kernels.linear_recurrence.naive import _check_groups


@triton.jit
def _linrec_step_kernel(
    q_ptr,  # [B, G, K]
    k_ptr,  # [B, G, K]
    v_ptr,  # [B, H, V]
    ld_ptr,  # [B, H]
    state_ptr,  # [S, H, K, V] fp32
    slot_ptr,  # [B] int64
    o_ptr,  # [B, H, V]
    scale,
    HEADS_PER_GROUP,
    DK,
    DV,
    stride_qb,
    stride_qg,
    stride_kb,
    stride_kg,
    stride_vb,
    stride_vh,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    stride_ss,
    stride_sh,
    stride_sk,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    pid_v = tl.program_id(2)
    group = head // HEADS_PER_GROUP
    slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_ptrs = state_ptr + slot * stride_ss + head * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
    s = tl.load(state_ptrs, mask=mask_kv, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_V]
    q = tl.load(q_ptr + pid_b * stride_qb + group * stride_qg + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pid_b * stride_kb + group * stride_kg + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + pid_b * stride_vb + head * stride_vh + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(ld_ptr + pid_b * stride_lb + head * stride_lh).to(tl.float32))
    s = s * decay + k[:, None] * v[None, :]
    # Each state element is loaded and stored by the same thread (same layout): no barrier needed.
    tl.store(state_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask_kv)
    o = tl.sum(q[:, None] * s, axis=0) * scale  # [BLOCK_V]
    tl.store(o_ptr + pid_b * stride_ob + head * stride_oh + offs_v, o.to(o_ptr.dtype.element_ty), mask=mask_v)


def linear_recurrence_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Same contract as ``recurrent.linear_recurrence_step``: q, k [B, G, K]; v [B, H, V]; log_decay
    [B, H]; state [S, H, K, V] fp32 (row ``slot_ids[b]`` updated in place). Returns o [B, H, V] in v's
    dtype. No host sync (CUDA-graph safe)."""
    rep = _check_groups(q, v)
    batch, _, dk = q.shape
    heads, dv = v.shape[1], v.shape[2]
    q, k, v, log_decay = (_last_dim_contiguous(t) for t in (q, k, v, log_decay))
    o = torch.empty_like(v)
    if batch == 0:
        return o
    if state.stride(3) != 1:
        raise ValueError("state must be contiguous in its last dim")
    block_k = triton.next_power_of_2(dk)
    # Keep the register tile near 4K elements; small batches split V further to fill the GPU.
    block_v = min(triton.next_power_of_2(dv), max(16, 4096 // block_k), 32 if batch * heads < 256 else 64)
    grid = (batch, heads, triton.cdiv(dv, block_v))
    _linrec_step_kernel[grid](
        q,
        k,
        v,
        log_decay,
        state,
        slot_ids,
        o,
        float(scale),
        rep,
        dk,
        dv,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        log_decay.stride(0),
        log_decay.stride(1),
        o.stride(0),
        o.stride(1),
        state.stride(0),
        state.stride(1),
        state.stride(2),
        BLOCK_K=block_k,
        BLOCK_V=block_v,
        num_warps=4 if block_k * block_v >= 4096 else 2,
    )
    return o
