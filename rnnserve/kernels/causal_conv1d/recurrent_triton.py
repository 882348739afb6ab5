"""Triton one-token causal conv1d step: shift the new input into the slot's cache and convolve, in place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_update_kernel(
    x_ptr,  # [B, C]
    w_ptr,  # [C, K]
    b_ptr,  # [C]
    state_ptr,  # [S, C, K-1]
    slot_ptr,  # [B] int64
    y_ptr,  # [B, C]
    C,
    stride_xb,
    stride_yb,
    stride_ss,
    stride_sc,
    stride_sk,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    state_row = state_ptr + slot * stride_ss + offs_c * stride_sc  # [BLOCK_C]
    x = tl.load(x_ptr + pid_b * stride_xb + offs_c, mask=mask_c, other=0.0)
    if HAS_BIAS:
        acc = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Window = cache columns 0..K-2, then x; the new cache is the window without its first column.
    # Every read happens before the barrier and every write after it: threads that hold replicated
    # copies of a channel must not overwrite a column another thread has yet to read.
    cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mask_k = cols < K - 1
    mask_2d = mask_c[:, None] & mask_k[None, :]
    cache = tl.load(state_row[:, None] + cols[None, :] * stride_sk, mask=mask_2d, other=0.0)  # [BLOCK_C, BLOCK_K]
    w = tl.load(w_ptr + offs_c[:, None] * K + cols[None, :], mask=mask_2d, other=0.0)
    acc += tl.sum(cache.to(tl.float32) * w.to(tl.float32), axis=1)
    w_last = tl.load(w_ptr + offs_c * K + (K - 1), mask=mask_c, other=0.0).to(tl.float32)
    acc += x.to(tl.float32) * w_last
    shifted = tl.load(
        state_row[:, None] + (cols[None, :] + 1) * stride_sk,
        mask=mask_c[:, None] & (cols[None, :] + 1 < K - 1),
        other=0.0,
    )
    new = tl.where(cols[None, :] == K - 2, x[:, None].to(state_ptr.dtype.element_ty), shifted)
    tl.debug_barrier()
    tl.store(state_row[:, None] + cols[None, :] * stride_sk, new, mask=mask_2d)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + pid_b * stride_yb + offs_c, acc.to(y_ptr.dtype.element_ty), mask=mask_c)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    slot_ids: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """Same contract as ``recurrent.causal_conv1d_update``: x [B, C], conv_state [S, C, K-1] (row
    ``slot_ids[b]`` updated in place), weight [C, K]. Returns y [B, C] in x's dtype. CUDA-graph safe."""
    if activation not in (None, "silu"):
        raise ValueError(f"unsupported activation {activation!r} (expected 'silu' or None)")
    batch, channels = x.shape
    width = weight.shape[1]
    if width < 2:
        raise ValueError("causal_conv1d_update needs a kernel width of at least 2")
    # Rows may be strided (x is usually a column slice of in_proj's output): no copy unless the
    # channels themselves are strided.
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if batch == 0:
        return y
    block_c = min(128 if batch >= 8 else 64, max(16, triton.next_power_of_2(channels)))
    grid = (batch, triton.cdiv(channels, block_c))
    _conv_update_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        conv_state,
        slot_ids,
        y,
        channels,
        x.stride(0),
        y.stride(0),
        conv_state.stride(0),
        conv_state.stride(1),
        conv_state.stride(2),
        K=width,
        HAS_BIAS=bias is not None,
        SILU=activation == "silu",
        BLOCK_C=block_c,
        BLOCK_K=triton.next_power_of_2(width - 1),
        num_warps=4 if block_c >= 128 else 2,
    )
    return y
