"""Triton one-token selective-state update (Mamba-1 decode), in place by slot index."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnserve.kernels.selective_scan.chunk_triton import _block_e, _row_major, _softplus


@triton.jit
def _state_update_kernel(
    state_ptr,  # [S, E, N] fp32
    x_ptr,  # [B, E]
    dt_ptr,  # [B, E]
    A_ptr,  # [E, N]
    B_ptr,  # [B, N]
    C_ptr,  # [B, N]
    D_ptr,  # [E]
    z_ptr,  # [B, E]
    dt_bias_ptr,  # [E]
    slot_ptr,  # [B] int64
    y_ptr,  # [B, E]
    E,
    N,
    stride_x,
    stride_dt,
    stride_b,
    stride_c,
    stride_z,
    stride_y,
    stride_ss,
    stride_se,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_e = tl.program_id(1)
    slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # [BLOCK_E]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_e = offs_e < E
    mask_n = offs_n < N
    mask_en = mask_e[:, None] & mask_n[None, :]
    state_ptrs = state_ptr + slot * stride_ss + offs_e[:, None] * stride_se + offs_n[None, :]  # [BLOCK_E, BLOCK_N]
    s = tl.load(state_ptrs, mask=mask_en, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_e[:, None] * N + offs_n[None, :], mask=mask_en, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * stride_x + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * stride_dt + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    Bt = tl.load(B_ptr + pid_b * stride_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + pid_b * stride_c + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    s = tl.exp(dt[:, None] * A) * s + (dt * x)[:, None] * Bt[None, :]
    # Each state element is read and written by the same thread (same layout), so no barrier is needed.
    tl.store(state_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask_en)
    y = tl.sum(s * Ct[None, :], axis=1)  # [BLOCK_E]
    if HAS_D:
        y += tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * stride_z + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * stride_y + offs_e, y.to(y_ptr.dtype.element_ty), mask=mask_e)


def selective_state_update(
    ssm_state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    slot_ids: torch.Tensor,
    dt_softplus: bool = True,
) -> torch.Tensor:
    """Same contract as ``recurrent.selective_state_update``: ssm_state [S, E, N] fp32 (row
    ``slot_ids[b]`` updated in place), x, dt, z [B, E], A [E, N], B, C [B, N]. Returns y [B, E] in x's
    dtype. No host sync (CUDA-graph safe)."""
    batch, channels = x.shape
    nstate = A.shape[1]
    x, dt, B, C = _row_major(x), _row_major(dt), _row_major(B), _row_major(C)
    z = _row_major(z) if z is not None else None
    A = A.contiguous()
    y = torch.empty_like(x)
    if batch == 0:
        return y
    if ssm_state.stride(2) != 1:
        raise ValueError("ssm_state must be contiguous in its last dim")
    block_e = _block_e(channels, batch)
    grid = (batch, triton.cdiv(channels, block_e))
    _state_update_kernel[grid](
        ssm_state,
        x,
        dt,
        A,
        B,
        C,
        D if D is not None else A,
        z if z is not None else x,
        dt_bias if dt_bias is not None else A,
        slot_ids,
        y,
        channels,
        nstate,
        x.stride(0),
        dt.stride(0),
        B.stride(0),
        C.stride(0),
        z.stride(0) if z is not None else 0,
        y.stride(0),
        ssm_state.stride(0),
        ssm_state.stride(1),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_DT_BIAS=dt_bias is not None,
        DT_SOFTPLUS=dt_softplus,
        BLOCK_E=block_e,
        BLOCK_N=triton.next_power_of_2(nstate),
        num_warps=2 if block_e * nstate <= 512 else 4,
    )
    return y
