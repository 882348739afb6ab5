"""RetNet (retentive network): the fla-hub HF layout, and torchscale-style retention by config.

Per layer and sequence the state is the retention matrix ``S [H, d_k, d_v]`` (fp32), updated by the
shared scalar-decay linear recurrence (``kernels/linear_recurrence``) with a constant decay per head
``γ_h = 1 - 2^{-5-h}``: ``S_n = γ S_{n-1} + k_nᵀ v_n``, ``o_n = d_k^{-1/2} q_n S_n``. Rotation phases
come from ``batch.positions`` (absolute), so nothing else about the position is stored.

Two retention styles (config field ``retention_style``, see models/README.md):

- ``"fla"`` (default, what fla-hub checkpoints use): RoPE with halves rotated (GPT-NeoX layout,
  ``θ_i = 10000^{-2i/d_k}``) and no output normalisation before the per-head RMSNorm.
- ``"torchscale"``: the xPos-like interleaved rotation with torchscale's frequencies
  (``θ_i = 10000^{-linspace(0, 1, d_k/2)_i}``, pairs ``(2i, 2i+1)``), and torchscale's output
  normalisation (``retention_norm``): ``"sqrt_cn"`` divides by ``√c_n``, ``c_n = Σ_{j≤n} γ^{n-j}``
  (its recurrent form; a function of the position, so no state), ``"abs_sum"`` additionally divides by
  ``max(1, |q_n · Σ_j γ^{n-j} k_j| / √c_n)`` (its parallel form). The key sum rides in the same
  recurrence as one extra column of ``S`` (``v`` gets a column of ones), so ``S`` is ``[H, d_k, d_v+1]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.dispatch import Backend, get_kernel
from rnnserve.models.base import DecodeBatch, PrefillBatch, RecurrentLM, States, StateSpec
from rnnserve.models.layers import quantize_int8
from rnnserve.models.weights import WeightsMapper, load_weights

RetentionStyle = Literal["fla", "torchscale"]
RetentionNorm = Literal["none", "sqrt_cn", "abs_sum"]
Activation = Literal["swish"] | None


def rms_norm(dim: int, eps: float, affine: bool = True) -> nn.RMSNorm:
    return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)


def _activation(x: torch.Tensor, act: Activation) -> torch.Tensor:
    return F.silu(x) if act == "swish" else x


@dataclass(frozen=True)
class RetentionConfig:
    """Everything the retention of one layer needs once q, k, v are projected."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    style: RetentionStyle = "fla"
    norm: RetentionNorm = "none"
    rope_theta: float = 10000.0
    # Factor on q·k; None: d_k^{-1/2}. DenseRetNet scales k itself before its dense fusion and passes 1.
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.style not in ("fla", "torchscale"):
            raise ValueError(f"retention_style must be 'fla' or 'torchscale', not {self.style!r}")
        if self.norm not in ("none", "sqrt_cn", "abs_sum"):
            raise ValueError(f"retention_norm must be 'none', 'sqrt_cn' or 'abs_sum', not {self.norm!r}")
        if self.head_k_dim % 2:
            raise ValueError(f"the rotated key head dim must be even, got {self.head_k_dim}")

    @property
    def state_shape(self) -> tuple[int, int, int]:
        extra = 1 if self.norm == "abs_sum" else 0
        return (self.num_heads, self.head_k_dim, self.head_v_dim + extra)


class Retention(nn.Module):
    """Rotation, the shared linear recurrence (from each sequence's slot state) and the output
    normalisation of one retention layer. Holds no weights: only fp32 constants (rotation
    frequencies, log γ per head), rebuilt by ``reset_constants`` after a dtype cast."""

    def __init__(self, cfg: RetentionConfig, backend: Backend) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.head_k_dim**-0.5 if cfg.scale is None else cfg.scale
        self._chunk = get_kernel("linear_recurrence.chunk", backend)
        self._step = get_kernel("linear_recurrence.recurrent", backend)
        self.register_buffer("inv_freq", torch.empty(cfg.head_k_dim // 2), persistent=False)
        self.register_buffer("log_gamma", torch.empty(cfg.num_heads), persistent=False)
        self.reset_constants()

    @torch.no_grad()
    def reset_constants(self) -> None:
        dk, dev = self.cfg.head_k_dim, self.inv_freq.device
        if self.cfg.style == "fla":
            inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, dk, 2, dtype=torch.float32, device=dev) / dk)
        else:
            inv = 1.0 / self.cfg.rope_theta ** torch.linspace(0, 1, dk // 2, dtype=torch.float32, device=dev)
        self.inv_freq = inv  # [d_k/2]
        heads = torch.arange(self.cfg.num_heads, dtype=torch.float32, device=dev)
        self.log_gamma = torch.log1p(-torch.pow(2.0, -5.0 - heads))  # [H], log γ_h

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [N, H, d_k] rotated at each token's absolute position (fp32 phases)."""
        theta = positions.float()[:, None] * self.inv_freq[None, :]  # [N, d_k/2]
        cos, sin = theta.cos()[:, None, :], theta.sin()[:, None, :]  # [N, 1, d_k/2]
        xf = x.float()
        if self.cfg.style == "fla":
            x1, x2 = xf.chunk(2, dim=-1)  # halves
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]  # pairs (2i, 2i+1)
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return out.to(x.dtype)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        state: torch.Tensor,
        slot_ids: torch.Tensor,
        seqs: Varlen | None,
    ) -> torch.Tensor:
        """q, k [N, H, d_k] (not rotated), v [N, H, d_v]; state [S, *state_shape] fp32, updated in place.
        ``seqs`` (the step's sequence boundaries) for a packed prefill, None for a decode step (one token per slot).
        Returns o [N, H, d_v] in fp32, normalised per ``cfg.norm`` (before the per-head RMSNorm)."""
        n = q.shape[0]
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        if self.cfg.norm == "abs_sum":
            v = torch.cat((v, v.new_ones(n, v.shape[1], 1)), dim=-1)  # [N, H, d_v+1]: last column sums keys
        log_decay = self.log_gamma.expand(n, -1).contiguous()  # [N, H]
        if seqs is None:
            o = self._step(q, k, v, log_decay, state, slot_ids, self.scale)
        else:
            o = self._chunk(q, k, v, log_decay, state, seqs, slot_ids, self.scale)
        o = o.float()
        if self.cfg.norm == "none":
            return o
        # c_n = Σ_{j<=n} γ^{n-j} = (1 - γ^{n+1}) / (1 - γ), computed with expm1 for small 1 - γ.
        steps = (positions.float() + 1.0)[:, None] * self.log_gamma[None, :]  # [N, H]
        c = torch.expm1(steps) / torch.expm1(self.log_gamma)[None, :]
        o = o * c.rsqrt()[..., None]
        if self.cfg.norm == "abs_sum":
            o, ksum = o[..., :-1], o[..., -1:]  # ksum: q·Σγ^{n-j}k_j / √c_n, [N, H, 1]
            o = o / ksum.abs().clamp(min=1.0)
        return o


@dataclass(frozen=True)
class RetNetConfig:
    """A RetNet's shape. ``intermediate_size = 0`` means no FFN (the GAU block DenseRetNet uses)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    key_dim: int  # total q width H·d_k
    value_dim: int  # total v width H·d_v
    intermediate_size: int
    norm_eps: float = 1e-6
    retention_style: RetentionStyle = "fla"
    retention_norm: RetentionNorm = "none"
    feature_map: Activation = None  # applied to q and k after projection (fla's ``feature_map``)
    value_act: Activation = None  # applied to v after projection (GAU: silu)
    use_output_gate: bool = True
    g_norm_affine: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(f"key dim {self.key_dim} and value dim {self.value_dim} must divide by {self.num_heads}")
        for act in (self.feature_map, self.value_act):
            if act not in (None, "swish"):
                raise ValueError(f"unsupported activation {act!r} (only 'swish' or none)")
        _ = self.retention  # validates style, norm and head dims

    @property
    def retention(self) -> RetentionConfig:
        return RetentionConfig(
            num_heads=self.num_heads,
            head_k_dim=self.key_dim // self.num_heads,
            head_v_dim=self.value_dim // self.num_heads,
            style=self.retention_style,
            norm=self.retention_norm,
        )

    @classmethod
    def from_hf(cls, c: dict) -> RetNetConfig:
        """fla's ``RetNetConfig`` fields (defaults as in fla) plus ``retention_style`` / ``retention_norm``."""
        if c.get("use_short_conv"):
            raise ValueError("RetNet with use_short_conv is not supported")
        if c.get("attn"):
            raise ValueError("hybrid RetNet with softmax-attention layers ('attn') is not supported")
        if c.get("hidden_act", "swish") != "swish":
            raise ValueError(f"unsupported RetNet hidden_act {c.get('hidden_act')!r} (fla supports only swish)")
        d = c.get("hidden_size", 2048)
        heads = c.get("num_heads", 8)
        key_dim, value_dim = d * c.get("expand_k", 1.0), d * c.get("expand_v", 2.0)
        if not (float(key_dim).is_integer() and float(value_dim).is_integer()):
            raise ValueError(f"hidden_size * expand_k / expand_v must be integers, got {key_dim}, {value_dim}")
        inter = c.get("intermediate_size")
        if inter is None:
            # fla's GatedMLP: 2/3 · hidden_ratio · D, rounded up to a multiple of 256.
            inter = int(d * (c.get("hidden_ratio") or 4) * 2 / 3)
            inter = 256 * ((inter + 255) // 256)
        style = c.get("retention_style", "fla")
        return cls(
            vocab_size=c.get("vocab_size", 32000),
            hidden_size=d,
            num_layers=c.get("num_hidden_layers", 24),
            num_heads=heads,
            num_kv_heads=c.get("num_kv_heads") or heads,
            key_dim=int(key_dim),
            value_dim=int(value_dim),
            intermediate_size=inter,
            norm_eps=c.get("norm_eps", c.get("rms_norm_eps", 1e-6)),  # early fla configs say rms_norm_eps
            retention_style=style,
            retention_norm=c.get("retention_norm", "abs_sum" if style == "torchscale" else "none"),
            feature_map=c.get("feature_map"),
            use_output_gate=c.get("use_output_gate", True),
            g_norm_affine=c.get("elementwise_affine", True) is not False,
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


class MultiScaleRetention(nn.Module):
    """fla's retention block: q/k/v/g projections, rotation + recurrence, per-head RMSNorm ⊙ swish(g), o_proj."""

    def __init__(self, cfg: RetNetConfig, backend: Backend) -> None:
        super().__init__()
        d, h, hkv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        self.cfg = cfg
        rcfg = cfg.retention
        self.head_k_dim, self.head_v_dim = rcfg.head_k_dim, rcfg.head_v_dim
        self.q_proj = nn.Linear(d, cfg.key_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.key_dim * hkv // h, bias=False)
        self.v_proj = nn.Linear(d, cfg.value_dim * hkv // h, bias=False)
        if cfg.use_output_gate:
            self.g_proj = nn.Linear(d, cfg.value_dim, bias=False)
        self.o_proj = nn.Linear(cfg.value_dim, d, bias=False)
        self.g_norm_swish_gate = rms_norm(rcfg.head_v_dim, cfg.norm_eps, cfg.g_norm_affine)
        self.retention = Retention(rcfg, backend)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> q [N, H, d_k], k [N, H_kv, d_k], v [N, H_kv, d_v] (activations applied)."""
        n = x.shape[0]
        q = _activation(self.q_proj(x), self.cfg.feature_map).view(n, -1, self.head_k_dim)
        k = _activation(self.k_proj(x), self.cfg.feature_map).view(n, -1, self.head_k_dim)
        v = _activation(self.v_proj(x), self.cfg.value_act).view(n, -1, self.head_v_dim)
        return q, k, v

    def mix(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        state: torch.Tensor,
        slot_ids: torch.Tensor,
        seqs: Varlen | None,
    ) -> torch.Tensor:
        """Retention over projected q, k, v, then the gated per-head norm and o_proj: [N, D]."""
        rep = self.cfg.num_heads // self.cfg.num_kv_heads
        if rep > 1:
            # fla's GQA: kv head j serves query heads j·rep .. j·rep + rep - 1.
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = self.retention(q, k, v, positions, state, slot_ids, seqs)  # [N, H, d_v] fp32
        o = self.g_norm_swish_gate(o.to(x.dtype))
        if self.cfg.use_output_gate:
            o = o * F.silu(self.g_proj(x)).view_as(o)
        return self.o_proj(o.flatten(1))

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        state: torch.Tensor,
        slot_ids: torch.Tensor,
        seqs: Varlen | None,
    ) -> torch.Tensor:
        q, k, v = self.project(x)
        return self.mix(x, q, k, v, positions, state, slot_ids, seqs)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RetNetBlock(nn.Module):
    def __init__(self, cfg: RetNetConfig, backend: Backend) -> None:
        super().__init__()
        self.attn_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.attn = MultiScaleRetention(cfg, backend)
        self.has_mlp = cfg.intermediate_size > 0
        if self.has_mlp:
            self.mlp_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        state: torch.Tensor,
        slot_ids: torch.Tensor,
        seqs: Varlen | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, state, slot_ids, seqs)
        if self.has_mlp:
            x = x + self.mlp(self.mlp_norm(x))
        return x

    def decode(
        self, x: torch.Tensor, positions: torch.Tensor, state: torch.Tensor, slot_ids: torch.Tensor
    ) -> torch.Tensor:
        """One token per sequence (x [B, D]); the unit the engine's CPU fast path compiles."""
        return self(x, positions, state, slot_ids, None)


class _Backbone(nn.Module):
    def __init__(self, cfg: RetNetConfig, backend: Backend) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(RetNetBlock(cfg, backend) for _ in range(cfg.num_layers))
        self.norm = rms_norm(cfg.hidden_size, cfg.norm_eps)


# Checkpoint names that carry no weights we use (fla keeps no rotary buffers, but other exports may).
_IGNORED_SUFFIXES = ("rotary.inv_freq",)


def _split_fused_gate_up(
    weights: Iterable[tuple[str, torch.Tensor]], intermediate_size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Older fla checkpoints fuse the MLP's gate and up projections in one ``gate_proj [2I, D]``: split
    into ``gate_proj`` and ``up_proj [I, D]``."""
    for name, tensor in weights:
        if name.endswith("mlp.gate_proj.weight") and tensor.shape[0] == 2 * intermediate_size:
            gate, up = tensor.chunk(2, dim=0)
            yield name, gate
            yield name.removesuffix("gate_proj.weight") + "up_proj.weight", up
        else:
            yield name, tensor


class RetNetLM(RecurrentLM):
    """RetNet in fla's HF layout (``RetNetForCausalLM``); parameter names equal checkpoint names."""

    def __init__(self, cfg: RetNetConfig, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.model = _Backbone(cfg, backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> RetNetLM:
        return cls(RetNetConfig.from_hf(config), backend)

    def state_specs(self) -> list[list[StateSpec]]:
        shape = self.cfg.retention.state_shape
        return [[StateSpec("S", shape, torch.float32)] for _ in range(self.cfg.num_layers)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = ("lm_head.weight",) if self.cfg.tie_word_embeddings else ()
        mapper = WeightsMapper(
            # fla names the gated norm g_norm when fuse_norm is off.
            substrings=((".attn.g_norm.", ".attn.g_norm_swish_gate."),),
            ignore_suffixes=_IGNORED_SUFFIXES + tied,
        )
        return load_weights(self, _split_fused_gate_up(weights, self.cfg.intermediate_size), mapper)

    def post_load(self) -> None:
        for module in self.modules():
            if isinstance(module, Retention):
                module.reset_constants()

    def quantize_int8(self) -> None:
        """int8 q / k / v / g / o projections, the gated MLP and the head: every matrix. The embedding
        lookup, RMSNorm weights, the retention constants, activations and the state stay fp32."""
        for layer in self.model.layers:
            attn = layer.attn
            for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj"):
                if hasattr(attn, name):  # g_proj only with an output gate
                    setattr(attn, name, quantize_int8(getattr(attn, name)))
            if layer.has_mlp:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    setattr(layer.mlp, name, quantize_int8(getattr(layer.mlp, name)))
        self.lm_head = quantize_int8(self.lm_head)  # a tied embedding keeps its fp32 weight for lookups

    def _run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_ids: torch.Tensor,
        seqs: Varlen | None,
        states: States,
    ) -> torch.Tensor:
        x = self.model.embeddings(input_ids)  # [N, D]
        for layer, st in zip(self.model.layers, states):
            if seqs is None:
                x = layer.decode(x, positions, st["S"], slot_ids)
            else:
                x = layer(x, positions, st["S"], slot_ids, seqs)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x)).float()

    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        x = self._run(batch.input_ids, batch.positions, batch.slot_ids, batch.varlen, states)
        return self._logits(x[batch.logits_indices])

    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        return self._logits(self._run(batch.input_ids, batch.positions, batch.slot_ids, None, states))
