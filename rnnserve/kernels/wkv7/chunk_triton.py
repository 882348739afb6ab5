"""Triton RWKV-7 WKV prefill over a packed variable-length batch, from and to the slot's state.

Per token ``S ← diag(e^{log_w}) S + b (aᵀ S) + k vᵀ``, ``o = rᵀ S`` with S [K, V] per head. Every
value column of S evolves on its own (the update mixes rows, never columns), so one program per
(sequence, head, block of value columns) owns a [K, BLOCK_V] slice of the state in registers and
steps through its sequence token by token, as RWKV's own CUDA kernel does: the state is read from
``state[slot]`` once and written back once, and the grid (B · H · V/BLOCK_V programs) supplies the
parallelism. The torch ``chunk.py`` holds the chunked WY form for the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnserve.kernels.chunking import Varlen


@triton.jit
def _wkv7_varlen_kernel(
    r_ptr,  # [T, H, K]
    w_ptr,  # [T, H, K] log-decay (<= 0)
    k_ptr,  # [T, H, K]
    v_ptr,  # [T, H, V]
    a_ptr,  # [T, H, K]
    b_ptr,  # [T, H, K]
    state_ptr,  # [S, H, K, V] fp32
    cu_ptr,  # [B+1] int32
    slot_ptr,  # [B] int64
    o_ptr,  # [T, H, V] fp32
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
    start = tl.load(cu_ptr + pid_b).to(tl.int64)
    end = tl.load(cu_ptr + pid_b + 1).to(tl.int64)
    slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_ptrs = state_ptr + slot * stride_ss + head * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
    s = tl.load(state_ptrs, mask=mask_kv, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_V]

    for t in range(start, end):
        kbase = (t * H + head) * DK + offs_k  # [BLOCK_K] into the [T, H, K] inputs
        vbase = (t * H + head) * DV + offs_v  # [BLOCK_V] into v and o
        r = tl.load(r_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.exp(tl.load(w_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32))
        k = tl.load(k_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + kbase, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + vbase, mask=mask_v, other=0.0).to(tl.float32)
        sa = tl.sum(a[:, None] * s, axis=0)  # [BLOCK_V], aᵀ S
        s = w[:, None] * s + b[:, None] * sa[None, :] + k[:, None] * v[None, :]
        o = tl.sum(r[:, None] * s, axis=0)  # [BLOCK_V], rᵀ S
        tl.store(o_ptr + vbase, o, mask=mask_v)

    tl.store(state_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask_kv)


def _block_v(dk: int, dv: int, rows: int) -> int:
    """Value columns per program: a register tile near 4K elements, narrower when few (sequence,
    head) pairs would leave most SMs idle."""
    block = min(triton.next_power_of_2(dv), max(16, 4096 // triton.next_power_of_2(dk)))
    while block > 16 and rows * triton.cdiv(dv, block) < 256:
        block //= 2
    return block


def wkv7_varlen(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Same contract as ``chunk.wkv7_varlen``: r, log_w, k, a, b [T, H, K]; v [T, H, V]; state
    [S, H, K, V] fp32 (updated in place for each slot). Returns o [T, H, V] fp32. ``chunk_size`` is
    accepted for signature parity and unused (the kernel steps token by token)."""
    del chunk_size
    _, heads, dk = k.shape
    dv = v.shape[-1]
    batch = slot_ids.shape[0]
    r, log_w, k, v, a, b = (t.contiguous() for t in (r, log_w, k, v, a, b))
    o = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    if batch == 0:
        return o
    if state.stride(3) != 1:
        raise ValueError("state must be contiguous in its last dim")
    block_v = _block_v(dk, dv, batch * heads)
    grid = (batch, heads, triton.cdiv(dv, block_v))
    _wkv7_varlen_kernel[grid](
        r,
        log_w,
        k,
        v,
        a,
        b,
        state,
        Varlen.of(cu_seqlens).cu_seqlens,
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
        num_warps=4,
    )
    return o
