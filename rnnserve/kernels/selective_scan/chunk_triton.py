"""Triton selective scan (Mamba-1) over a packed variable-length batch, from and to the slot's state.

Each channel has its own N decays, so the scan does not reduce to matrix products; the kernel is the
classic parallel-over-channels, sequential-over-time scan (as mamba_ssm's CUDA kernel): one program
per (sequence, block of channels) keeps its [BLOCK_E, N] state in registers for the whole sequence,
reads it from ``ssm_state[slot]`` once and writes it back once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnserve.kernels.chunking import Varlen


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with its default threshold of 20.
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _scan_varlen_kernel(
    x_ptr,  # [T, E]
    dt_ptr,  # [T, E]
    A_ptr,  # [E, N]
    B_ptr,  # [T, N]
    C_ptr,  # [T, N]
    D_ptr,  # [E]
    z_ptr,  # [T, E]
    dt_bias_ptr,  # [E]
    state_ptr,  # [S, E, N] fp32
    cu_ptr,  # [B+1] int32
    slot_ptr,  # [B] int64
    y_ptr,  # [T, E]
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
    start = tl.load(cu_ptr + pid_b).to(tl.int64)
    end = tl.load(cu_ptr + pid_b + 1).to(tl.int64)
    slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # [BLOCK_E]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_e = offs_e < E
    mask_n = offs_n < N
    mask_en = mask_e[:, None] & mask_n[None, :]
    state_ptrs = state_ptr + slot * stride_ss + offs_e[:, None] * stride_se + offs_n[None, :]  # [BLOCK_E, BLOCK_N]
    s = tl.load(state_ptrs, mask=mask_en, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_e[:, None] * N + offs_n[None, :], mask=mask_en, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)

    for t in range(start, end):
        x = tl.load(x_ptr + t * stride_x + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + t * stride_dt + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += dt_bias
        if DT_SOFTPLUS:
            dt = _softplus(dt)
        Bt = tl.load(B_ptr + t * stride_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + t * stride_c + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        s = tl.exp(dt[:, None] * A) * s + (dt * x)[:, None] * Bt[None, :]
        y = tl.sum(s * Ct[None, :], axis=1)  # [BLOCK_E]
        if HAS_D:
            y += D * x
        if HAS_Z:
            z = tl.load(z_ptr + t * stride_z + offs_e, mask=mask_e, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(y_ptr + t * stride_y + offs_e, y.to(y_ptr.dtype.element_ty), mask=mask_e)

    tl.store(state_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask_en)


def _block_e(channels: int, rows: int) -> int:
    """Channels per program: 32, halved while the grid would leave most of a GPU's SMs idle."""
    block = 32
    while block > 8 and rows * triton.cdiv(channels, block) < 256:
        block //= 2
    return block


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1 and the first with its own stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def selective_scan_varlen(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    dt_softplus: bool = True,
) -> torch.Tensor:
    """Same contract as ``chunk.selective_scan_varlen``: x, dt, z [T, E]; A [E, N]; B, C [T, N];
    ssm_state [S, E, N] fp32 (updated in place for each slot). Returns y [T, E] in x's dtype."""
    _, channels = x.shape
    nstate = A.shape[1]
    batch = slot_ids.shape[0]
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
    _scan_varlen_kernel[grid](
        x,
        dt,
        A,
        B,
        C,
        D if D is not None else A,
        z if z is not None else x,
        dt_bias if dt_bias is not None else A,
        ssm_state,
        Varlen.of(cu_seqlens).cu_seqlens,
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
