"""Triton one-token RWKV-7 WKV step, in place by slot index.

One program per (sequence, head, block of value columns): ``S ← diag(e^{log_w}) S + b (aᵀ S) + k vᵀ``,
``o = rᵀ S``, the [K, BLOCK_V] state slice read once and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnserve.kernels.wkv7.chunk_triton import _block_v


@triton.jit
def _wkv7_step_kernel(
    r_ptr,  # [B, H, K]
    w_ptr,  # [B, H, K] log-decay
    k_ptr,  # [B, H, K]
    v_ptr,  # [B, H, V]
    a_ptr,  # [B, H, K]
    b_ptr,  # [B, H, K]
    state_ptr,  # [S, H, K, V] fp32
    slot_ptr,  # [B] int64
    o_ptr,  # [B, H, V] fp32
    H,
    DK,
    DV,
    stride_ss,
    stride_sh,
    stride_sk,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    pid_v = tl.program_id(2)
    slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_ptrs = state_ptr + slot * stride_ss + head * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
    s = tl.load(state_ptrs, mask=mask_kv, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_V]
    kbase = (pid_b * H + head) * DK + offs_k
    vbase = (pid_b * H + head) * DV + offs_v
    r = tl.load(r_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32)
    w = tl.exp(tl.load(w_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32))
    k = tl.load(k_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + vbase, mask=mask_v, other=0.0).to(tl.float32)
    sa = tl.sum(a[:, None] * s, axis=0)  # [BLOCK_V], aᵀ S
    s = w[:, None] * s + b[:, None] * sa[None, :] + k[:, None] * v[None, :]
    # Each state element is loaded and stored by the same thread (same layout): no barrier needed.
    tl.store(state_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask_kv)
    o = tl.sum(r[:, None] * s, axis=0)
    tl.store(o_ptr + vbase, o, mask=mask_v)


def wkv7_step(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``recurrent.wkv7_step``: r, log_w, k, a, b [B, H, K]; v [B, H, V]; state
    [S, H, K, V] fp32 (rows ``slot_ids`` updated in place). Returns o [B, H, V] fp32. CUDA-graph safe."""
    batch, heads, dk = k.shape
    dv = v.shape[-1]
    r, log_w, k, v, a, b = (t.contiguous() for t in (r, log_w, k, v, a, b))
    o = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    if batch == 0:
        return o
    if state.stride(3) != 1:
        raise ValueError("state must be contiguous in its last dim")
    block_v = _block_v(dk, dv, batch * heads)
    grid = (batch, heads, triton.cdiv(dv, block_v))
    _wkv7_step_kernel[grid](
        r,
        log_w,
        k,
        v,
        a,
        b,
        state,
        slot_ids,
        o,
        heads,
        dk,
        dv,
        state.stride(0),
        state.stride(1),
        state.stride(2),
        BLOCK_K=triton.next_power_of_2(dk),
        BLOCK_V=block_v,
        num_warps=4 if triton.next_power_of_2(dk) * block_v >= 4096 else 2,
    )
    return o
