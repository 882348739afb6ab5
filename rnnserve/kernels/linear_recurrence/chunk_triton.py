"""Triton chunked scalar-decay linear recurrence (Mamba-2 SSD, RetNet retention) over a packed
variable-length batch, from and to the slot's state.

One program per (sequence, head, block of value columns) walks its sequence chunk by chunk, keeping
its [K, BLOCK_V] slice of the state in registers. Within a chunk of L tokens with cumulative
log-decay a (inclusive), everything is matrix products:

    o     = scale · ((q S_prev) ⊙ exp(a) + ((q kᵀ) ⊙ M) v),   M_ij = exp(a_i - a_j) for i >= j, else 0
    S_new = exp(a_L) S_prev + (k ⊙ exp(a_L - a))ᵀ v

Padding rows past a sequence's end load k = v = 0 and log-decay 0, so they add nothing and decay nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.linear_recurrence.naive import _check_groups


@triton.jit
def _linrec_varlen_kernel(
    q_ptr,  # [T, G, K]
    k_ptr,  # [T, G, K]
    v_ptr,  # [T, H, V]
    ld_ptr,  # [T, H] fp32
    state_ptr,  # [S, H, K, V] fp32
    cu_ptr,  # [B+1] int32
    slot_ptr,  # [B] int64
    o_ptr,  # [T, H, V]
    scale,
    HEADS_PER_GROUP,
    DK,
    DV,
    stride_qt,
    stride_qg,
    stride_kt,
    stride_kg,
    stride_vt,
    stride_vh,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    stride_ss,
    stride_sh,
    stride_sk,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    pid_v = tl.program_id(2)
    group = head // HEADS_PER_GROUP
    start = tl.load(cu_ptr + pid_b).to(tl.int64)
    end = tl.load(cu_ptr + pid_b + 1).to(tl.int64)
    slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_t = tl.arange(0, BLOCK_T)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    state_ptrs = state_ptr + slot * stride_ss + head * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
    mask_kv = mask_k[:, None] & mask_v[None, :]
    s = tl.load(state_ptrs, mask=mask_kv, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_V]
    causal = offs_t[:, None] >= offs_t[None, :]  # [BLOCK_T, BLOCK_T]

    for t0 in range(start, end, BLOCK_T):
        rows = t0 + offs_t  # [BLOCK_T]
        mask_t = rows < end
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + group * stride_qg + offs_k[None, :],
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_T, BLOCK_K]
        k = tl.load(
            k_ptr + rows[:, None] * stride_kt + group * stride_kg + offs_k[None, :],
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_T, BLOCK_K]
        v = tl.load(
            v_ptr + rows[:, None] * stride_vt + head * stride_vh + offs_v[None, :],
            mask=mask_t[:, None] & mask_v[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_T, BLOCK_V]
        ld = tl.load(ld_ptr + rows * stride_lt + head * stride_lh, mask=mask_t, other=0.0).to(tl.float32)
        a = tl.cumsum(ld, axis=0)  # [BLOCK_T] inclusive cumulative log-decay
        a_last = tl.sum(ld, axis=0)
        # exp only where i >= j, so the masked-out upper triangle cannot overflow.
        decay = tl.exp(tl.where(causal, a[:, None] - a[None, :], float("-inf")))  # [BLOCK_T, BLOCK_T]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay
        # The carried state is fp32 and accumulates over the whole sequence: products with it stay
        # exact fp32 (ieee), whatever the inputs' dtype; only the intra-chunk products may use tf32.
        o = tl.dot(q, s, input_precision="ieee") * tl.exp(a)[:, None]
        o += tl.dot(scores, v, input_precision=PRECISION)
        tl.store(
            o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_v[None, :],
            (o * scale).to(o_ptr.dtype.element_ty),
            mask=mask_t[:, None] & mask_v[None, :],
        )
        k_decayed = k * tl.exp(a_last - a)[:, None]
        s = s * tl.exp(a_last) + tl.dot(tl.trans(k_decayed), v, input_precision="ieee")

    tl.store(state_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask_kv)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def linear_recurrence_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Same contract as ``chunk.linear_recurrence_varlen``: q, k [T, G, K]; v [T, H, V]; log_decay [T, H];
    state [S, H, K, V] fp32 (updated in place for each slot). Returns o [T, H, V] in v's dtype.

    ``chunk_size`` overrides the heuristic's chunk length (rounded up to a power of two >= 16, as
    ``tl.dot`` needs; the chunk length never changes the result, only the speed)."""
    rep = _check_groups(q, v)
    _, _, dk = q.shape
    heads, dv = v.shape[1], v.shape[2]
    batch = slot_ids.shape[0]
    q, k, v, log_decay = (_last_dim_contiguous(t) for t in (q, k, v, log_decay))
    o = torch.empty_like(v)
    if batch == 0:
        return o
    if state.stride(3) != 1:
        raise ValueError("state must be contiguous in its last dim")
    # tl.dot needs every dim >= 16; registers bound BLOCK_K * (BLOCK_T + BLOCK_V).
    block_k = max(16, triton.next_power_of_2(dk))
    block_v = min(max(16, triton.next_power_of_2(dv)), 64 if block_k <= 64 else 32)
    block_t = max(16, triton.next_power_of_2(chunk_size)) if chunk_size else (64 if block_k <= 64 else 32)
    grid = (batch, heads, triton.cdiv(dv, block_v))
    _linrec_varlen_kernel[grid](
        q,
        k,
        v,
        log_decay,
        state,
        Varlen.of(cu_seqlens).cu_seqlens,
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
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        BLOCK_V=block_v,
        # fp32 models get exact fp32 products; half-precision inputs already carry more error than tf32.
        PRECISION="ieee" if v.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return o
