"""Triton causal depthwise conv1d over a packed variable-length batch, from and to a conv-state cache.

One program per (sequence, block of channels) walks its sequence in blocks of tokens, so the
cached K-1 inputs it reads at the start and the ones it writes at the end belong to the same
program: no other program touches that slot, and the in-place update needs no second pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnserve.kernels.chunking import Varlen


@triton.jit
def _conv_varlen_kernel(
    x_ptr,  # [T, C]
    w_ptr,  # [C, K]
    b_ptr,  # [C] (unused when HAS_BIAS is false)
    state_ptr,  # [S, C, K-1]
    cu_ptr,  # [B+1] int32
    slot_ptr,  # [B] int64
    y_ptr,  # [T, C]
    C,
    stride_xt,
    stride_yt,
    stride_ss,
    stride_sc,
    stride_sk,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    start = tl.load(cu_ptr + pid_b).to(tl.int64)
    end = tl.load(cu_ptr + pid_b + 1).to(tl.int64)
    seqlen = end - start
    slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    offs_t = tl.arange(0, BLOCK_T)  # [BLOCK_T]
    state_row = state_ptr + slot * stride_ss + offs_c[None, :] * stride_sc  # [1, BLOCK_C]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)

    for t0 in range(0, seqlen, BLOCK_T):
        pos = t0 + offs_t  # [BLOCK_T] position inside the sequence
        mask_t = pos < seqlen
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + bias[None, :]
        for k in tl.static_range(K):
            # Tap k reads input position pos - (K-1) + k; a negative one is cached column K-1 + src.
            src = pos - (K - 1) + k  # [BLOCK_T]
            in_seq = (src >= 0) & mask_t
            from_x = tl.load(
                x_ptr + (start + src)[:, None] * stride_xt + offs_c[None, :],
                mask=in_seq[:, None] & mask_c[None, :],
                other=0.0,
            ).to(tl.float32)
            in_cache = (src < 0) & mask_t
            from_cache = tl.load(
                state_row + (K - 1 + src)[:, None] * stride_sk,
                mask=in_cache[:, None] & mask_c[None, :],
                other=0.0,
            ).to(tl.float32)
            w = tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0.0).to(tl.float32)  # [BLOCK_C]
            acc += (from_x + from_cache) * w[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(
            y_ptr + (start + pos)[:, None] * stride_yt + offs_c[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=mask_t[:, None] & mask_c[None, :],
        )

    # New cache column j = input position seqlen - (K-1) + j of (cached ++ new). All columns are
    # loaded before any is stored, since a short prompt's new column j can come from old column j' > j.
    cols = tl.arange(0, BLOCK_K)
    src = seqlen - (K - 1) + cols  # [BLOCK_K]
    mask_k = cols < K - 1
    from_x = tl.load(
        x_ptr + (start + src)[:, None] * stride_xt + offs_c[None, :],
        mask=((src >= 0) & mask_k)[:, None] & mask_c[None, :],
        other=0.0,
    )
    from_cache = tl.load(
        state_row + (K - 1 + src)[:, None] * stride_sk,
        mask=((src < 0) & mask_k)[:, None] & mask_c[None, :],
        other=0.0,
    )
    new = tl.where((src >= 0)[:, None], from_x.to(tl.float32), from_cache.to(tl.float32))
    # Threads holding replicated copies of a channel must all have read the old cache before any writes.
    tl.debug_barrier()
    tl.store(
        state_row + cols[:, None] * stride_sk,
        new.to(state_ptr.dtype.element_ty),
        mask=mask_k[:, None] & mask_c[None, :],
    )


def _block_c(channels: int, batch: int) -> int:
    """Channels per program: wide blocks, but narrow enough that a small batch still fills the GPU."""
    block = 64 if batch * triton.cdiv(channels, 64) >= 128 else 32
    return min(block, max(16, triton.next_power_of_2(channels)))


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor | Varlen,
    slot_ids: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """Same contract as ``chunk.causal_conv1d_varlen``: x [T, C], weight [C, K], conv_state [S, C, K-1]
    (updated in place for each slot), cu_seqlens [B+1], slot_ids [B]. Returns y [T, C] in x's dtype."""
    if activation not in (None, "silu"):
        raise ValueError(f"unsupported activation {activation!r} (expected 'silu' or None)")
    channels = x.shape[1]
    width = weight.shape[1]
    batch = slot_ids.shape[0]
    # Rows may be strided (x is usually a column slice of in_proj's output): no copy unless the
    # channels themselves are strided.
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if batch == 0:
        return y
    block_c = _block_c(channels, batch)
    grid = (batch, triton.cdiv(channels, block_c))
    _conv_varlen_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        conv_state,
        Varlen.of(cu_seqlens).cu_seqlens,
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
        BLOCK_T=32,
        BLOCK_C=block_c,
        BLOCK_K=triton.next_power_of_2(max(width - 1, 1)),
        num_warps=4,
    )
    return y
