"""Small pieces several families share: RMS norms (plain and gated), DenseSSM's selection MLP and
the LM head helper.
Parameter names match the checkpoints (``norm.weight``), so families can load by name."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] normalised in fp32, cast to the weight's dtype, then scaled (as transformers'
    Mamba/LLaMA RMSNorm do when the input is already in the model dtype)."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op, same maths
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(weight.dtype)


def gated_rms_norm(
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    groups: int = 1,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """RMSNorm with a SiLU gate, over ``groups`` contiguous blocks of the last dim (y, gate [..., E]).

    norm_before_gate=False: ``norm(y ⊙ silu(gate)) ⊙ weight`` (Mamba-2); True: ``norm(y) ⊙ weight ⊙
    silu(gate)``."""
    shape = y.shape
    h = y.float()
    if not norm_before_gate:
        h = h * F.silu(gate.float())
    h = h.view(*shape[:-1], groups, shape[-1] // groups)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).view(shape)
    if norm_before_gate:
        return (weight * h.to(weight.dtype)) * F.silu(gate.float()).to(weight.dtype)
    return weight * h.to(weight.dtype)


class RMSNorm(nn.Module):
    """An RMSNorm whose only parameter is ``weight [D]`` (checkpoint name ``<prefix>.weight``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class DenseSelect(nn.Module):
    """DenseSSM's selection MLP, fc2(silu(fc1(x))): D -> D/32 -> out (the released DenseRetNet's
    ``k_select`` / ``v_select``, and DenseMamba's gate over earlier layers' outputs)."""

    def __init__(self, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size // 32, bias=False)
        self.fc2 = nn.Linear(hidden_size // 32, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def lm_logits(h: torch.Tensor, head: nn.Linear | Int8Linear) -> torch.Tensor:
    """Logits [M, V] in float32 (the sampler and logprobs need the precision) from h [M, D].

    On the CPU a row-major head (e.g. tied to the embedding) is applied as (W hᵀ)ᵀ: for a few rows
    that is up to 1.5x faster than ``F.linear``, which repacks the whole [V, D] matrix."""
    if isinstance(head, Int8Linear):
        return head(h)
    h = h.to(head.weight.dtype)
    w = head.weight
    if w.device.type == "cpu" and w.is_contiguous() and head.bias is None:
        return torch.mm(w, h.t()).t().float()
    return head(h).float()


def use_column_major_weight(linear: nn.Linear) -> None:
    """Store a linear layer's weight [out, in] column-major (the contiguous [in, out] transpose, seen
    through ``.t()``): same values, names and shape, but on the CPU ``F.linear`` then multiplies
    without repacking the weight, 2x faster for a decode batch of a few rows and no slower for a
    prefill. Do not use on a weight shared with an embedding (row lookups want row-major)."""
    linear.weight.data = linear.weight.data.t().contiguous().t()


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one fp32 scale per output channel (``--quantization int8``).

    On the CPU through fbgemm's dynamic-quantized linear: the weight [out, in] is stored as int8
    (scale = max|row| / 127, zero point 0) and packed once; each call quantizes its input on the fly to
    8 bits, multiplies in int32 and returns fp32. fbgemm picks one input scale per call from the
    input's range, which would make a row's result depend on the rows batched with it; so each row is
    first divided by its own max |x| and an anchor row (+1, -1, 0, ...) is appended: the range is then
    always [-1, 1], every row is quantized the same whatever its batch (one scale per row, as llama.cpp
    quantizes activations per block for its Q8_0 dot products), and the output is scaled back. All else
    (norms, conv, scan, recurrent state, residual) stays fp32. It reads 4x fewer weight bytes than fp32,
    and fbgemm's int8 kernels are also faster than fp32 GEMM for a few rows.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError("int8 quantization runs on the CPU only (fbgemm)")
        w = weight.detach().float().contiguous()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out], a zero row keeps a valid scale
        with warnings.catch_warnings():
            # torch 2.13 flags quantized-tensor constructors as deprecated; fbgemm's packed format still
            # needs one, once, at load time.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(
                w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8
            )
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)  # the bias is added after rescaling
        # The int8 values and scales, kept for inspection and tests (the packed copy is what runs).
        self.register_buffer("qweight", qweight.int_repr(), persistent=False)  # [out, in] int8
        self.register_buffer("scale", scale, persistent=False)  # [out] fp32
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        anchor = torch.zeros(1, w.shape[1])
        anchor[0, 0], anchor[0, -1] = 1.0, -1.0
        self.register_buffer("_anchor", anchor, persistent=False)  # [1, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()  # [M, in]
        r = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)  # [M, 1]
        xin = torch.cat([rows / r, self._anchor])  # [M + 1, in], range exactly [-1, 1]
        # reduce_range=True: fbgemm's AVX2 kernels add pairs of u8*s8 products in int16, so the input
        # uses 7 bits to keep those sums from saturating.
        y = torch.ops.quantized.linear_dynamic(xin, self._packed, True)[:-1].mul_(r)  # [M, out]
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(linear: nn.Linear) -> Int8Linear:
    """The int8 counterpart of ``linear`` (its weight may stay shared elsewhere, e.g. a tied embedding)."""
    return Int8Linear(linear.weight, linear.bias)
