"""DenseRetNet (DenseSSM, arXiv 2403.00818): a gated-attention-unit RetNet whose layers fuse the keys and
values of the ``m = dense_block_layers`` previous layers for the same token.

Layout and names follow the public DenseSSM release (``modeling_dense_gau_retnet.py``, LlamaConfig fields
plus ``query_key_dim``, ``v_factor``, ``dense_block_layers``). Per layer l, with x̂ = RMSNorm(h):

- ``q = silu(W_q x̂)``, ``k_raw = silu(W_k x̂) · d_k^{-1/2}``, ``[v_raw, gate] = silu(W_hidden x̂)``;
- for l >= 1 and m >= 1: ``g_k = silu(k_select(x̂))``, ``g_v = silu(v_select(x̂))`` (two-layer MLPs through
  D/32), ``k = RMSNorm_k(k_raw + Σ_j g_k ⊙ k_raw^{(l-j)})``, ``v = RMSNorm_v(v_raw + Σ_j g_v ⊙ v_raw^{(l-j)})``
  over the (up to m) previous layers' pre-fusion values; otherwise k = k_raw, v = v_raw;
- torchscale retention (interleaved rotation after the fusion, ``γ_h = 1 - 2^{-5-h}``) divided by ``√c_n``,
  per-head RMSNorm (with weight), ``h += W_out(norm(o) ⊙ gate)``. No separate FFN.

The fused values come from the same token, so they are transient within one forward, not state: the
state per layer is the retention matrix ``S [H, d_k, d_v]`` alone, as in RetNet.

Normalisation: the public parallel form divides each score row by ``clamp(Σ_j |score_ij|, 1, 5e4)``,
which no fixed-size state can reproduce; its recurrent (generation) form divides by ``√c_n``. The two
differ by a positive factor per token and head that the following RMSNorm removes up to its eps; we
implement the recurrent form for prefill and decode alike. With ``dense_block_layers = 0`` we apply no
fusion and no k/v norm (the public code still applies k_norm / v_norm at m = 0; every released config
uses m = 1), so the model reduces exactly to a plain GAU RetNet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.dispatch import Backend
from rnnserve.models.base import DecodeBatch, PrefillBatch, RecurrentLM, States, StateSpec
from rnnserve.models.layers import DenseSelect, quantize_int8
from rnnserve.models.retnet import Retention, RetentionConfig, rms_norm
from rnnserve.models.weights import WeightsMapper, load_weights

# Checkpoint tensors we do not need: the released model stores its rotation angles and decays as buffers.
_IGNORED_SUFFIXES = ("retnet_rel_pos.angle", "retnet_rel_pos.decay")
# The dense connection's weights (in layers >= 1 when dense_block_layers > 0).
_DENSE_NAMES = (".k_select.", ".v_select.", ".k_norm.", ".v_norm.")


@dataclass(frozen=True)
class DenseRetNetConfig:
    vocab_size: int
    hidden_size: int
    query_key_dim: int
    value_dim: int  # E = v_factor · D
    num_heads: int
    num_layers: int
    dense_block_layers: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.query_key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(
                f"query_key_dim {self.query_key_dim} and v_factor·hidden_size {self.value_dim} must divide by "
                f"num_attention_heads {self.num_heads}"
            )
        if self.dense_block_layers < 0:
            raise ValueError("dense_block_layers must be >= 0")
        if self.dense_block_layers and self.hidden_size // 32 < 1:
            raise ValueError("dense fusion needs hidden_size >= 32 (its selection MLPs go through hidden_size/32)")
        _ = self.retention  # validates head dims

    @property
    def retention(self) -> RetentionConfig:
        return RetentionConfig(
            num_heads=self.num_heads,
            head_k_dim=self.query_key_dim // self.num_heads,
            head_v_dim=self.value_dim // self.num_heads,
            style="torchscale",
            norm="sqrt_cn",
            scale=1.0,  # k is scaled before the fusion
        )

    @classmethod
    def from_hf(cls, c: dict) -> DenseRetNetConfig:
        for key in ("hidden_size", "query_key_dim", "num_attention_heads", "num_hidden_layers", "vocab_size"):
            if key not in c:
                raise ValueError(f"DenseRetNet config lacks {key!r}")
        d = c["hidden_size"]
        value_dim = d * c.get("v_factor", 2)
        if not float(value_dim).is_integer():
            raise ValueError(f"hidden_size * v_factor must be an integer, got {value_dim}")
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=d,
            query_key_dim=c["query_key_dim"],
            value_dim=int(value_dim),
            num_heads=c["num_attention_heads"],
            num_layers=c["num_hidden_layers"],
            dense_block_layers=c.get("dense_block_layers", 1),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


class GauRetention(nn.Module):
    """One DenseRetNet layer's mixer, in three steps so the model can fuse k and v between them."""

    def __init__(self, cfg: DenseRetNetConfig, backend: Backend) -> None:
        super().__init__()
        d, qk, e = cfg.hidden_size, cfg.query_key_dim, cfg.value_dim
        self.cfg = cfg
        rcfg = cfg.retention
        self.head_k_dim, self.head_v_dim = rcfg.head_k_dim, rcfg.head_v_dim
        self.k_scale = rcfg.head_k_dim**-0.5
        self.q_proj = nn.Linear(d, qk, bias=False)
        self.k_proj = nn.Linear(d, qk, bias=False)
        self.to_hidden = nn.Sequential(nn.Linear(d, 2 * e, bias=False))
        self.to_out = nn.Sequential(nn.Linear(e, d, bias=False))
        self.group_norm = rms_norm(rcfg.head_v_dim, cfg.rms_norm_eps)
        if cfg.dense_block_layers:
            # The release builds these in every layer (layer 0 never uses them); shapes as released:
            # k_select ends at D/2 and v_select at 2D, which must equal query_key_dim and v_factor·D.
            self.k_select = DenseSelect(d, qk)
            self.v_select = DenseSelect(d, e)
            self.k_norm = rms_norm(qk, cfg.rms_norm_eps)
            self.v_norm = rms_norm(e, cfg.rms_norm_eps)
        self.retention = Retention(rcfg, backend)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x̂ [N, D] -> q [N, qk], k_raw [N, qk] (scaled), v_raw [N, E], gate [N, E]."""
        q = F.silu(self.q_proj(x))
        k = F.silu(self.k_proj(x)) * self.k_scale
        v, gate = F.silu(self.to_hidden(x)).chunk(2, dim=-1)
        return q, k, v, gate

    def fuse(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the gated pre-fusion k/v of earlier layers (same tokens) and normalise: [N, qk], [N, E]."""
        g_k, g_v = F.silu(self.k_select(x)), F.silu(self.v_select(x))
        for k_past, v_past in past:
            k = k + g_k * k_past
            v = v + g_v * v_past
        return self.k_norm(k), self.v_norm(v)

    def mix(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gate: torch.Tensor,
        positions: torch.Tensor,
        state: torch.Tensor,
        slot_ids: torch.Tensor,
        seqs: Varlen | None,
    ) -> torch.Tensor:
        n = q.shape[0]
        o = self.retention(
            q.view(n, -1, self.head_k_dim),
            k.view(n, -1, self.head_k_dim),
            v.view(n, -1, self.head_v_dim),
            positions,
            state,
            slot_ids,
            seqs,
        )  # [N, H, d_v] fp32
        o = self.group_norm(o.to(gate.dtype)).flatten(1) * gate
        return self.to_out(o)


# Per earlier layer, its pre-fusion (k_raw [N, qk], v_raw [N, E]) for the same tokens.
DenseWindow = list[tuple[torch.Tensor, torch.Tensor]]


class DenseRetNetLayer(nn.Module):
    def __init__(self, cfg: DenseRetNetConfig, backend: Backend, fuse: bool) -> None:
        super().__init__()
        self.fuse = fuse  # layer >= 1 with m >= 1
        self.input_layernorm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GauRetention(cfg, backend)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        state: torch.Tensor,
        slot_ids: torch.Tensor,
        seqs: Varlen | None,
        past: DenseWindow,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (new x, this layer's k_raw, v_raw); state updated in place by slot."""
        attn = self.self_attn
        h = self.input_layernorm(x)
        q, k_raw, v_raw, gate = attn.project(h)
        k, v = attn.fuse(h, k_raw, v_raw, past) if self.fuse else (k_raw, v_raw)
        return x + attn.mix(q, k, v, gate, positions, state, slot_ids, seqs), k_raw, v_raw

    def decode(
        self, x: torch.Tensor, positions: torch.Tensor, state: torch.Tensor, slot_ids: torch.Tensor, past: DenseWindow
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per sequence; the unit the engine's CPU fast path compiles."""
        return self(x, positions, state, slot_ids, None, past)


class _Backbone(nn.Module):
    def __init__(self, cfg: DenseRetNetConfig, backend: Backend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DenseRetNetLayer(cfg, backend, fuse=cfg.dense_block_layers > 0 and i > 0) for i in range(cfg.num_layers)
        )
        self.norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps)


class DenseRetNetLM(RecurrentLM):
    """DenseRetNet in the public DenseSSM layout; parameter names equal checkpoint names."""

    def __init__(self, cfg: DenseRetNetConfig, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.model = _Backbone(cfg, backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> DenseRetNetLM:
        return cls(DenseRetNetConfig.from_hf(config), backend)

    def state_specs(self) -> list[list[StateSpec]]:
        shape = self.cfg.retention.state_shape
        return [[StateSpec("S", shape, torch.float32)] for _ in range(self.cfg.num_layers)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = ("lm_head.weight",) if self.cfg.tie_word_embeddings else ()
        if self.cfg.dense_block_layers == 0:  # the dense connection is off: its weights are unused
            weights = ((n, t) for n, t in weights if not any(s in n for s in _DENSE_NAMES))
        return load_weights(self, weights, WeightsMapper(ignore_suffixes=_IGNORED_SUFFIXES + tied))

    def post_load(self) -> None:
        for module in self.modules():
            if isinstance(module, Retention):
                module.reset_constants()

    def quantize_int8(self) -> None:
        """int8 q / k projections, to_hidden, to_out and the head. The dense selection MLPs (through
        D/32, ~3% of a layer's weights) stay fp32 with the embedding, norms, activations and the state."""
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.q_proj = quantize_int8(attn.q_proj)
            attn.k_proj = quantize_int8(attn.k_proj)
            attn.to_hidden[0] = quantize_int8(attn.to_hidden[0])
            attn.to_out[0] = quantize_int8(attn.to_out[0])
        self.lm_head = quantize_int8(self.lm_head)  # a tied embedding keeps its fp32 weight for lookups

    def _run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_ids: torch.Tensor,
        seqs: Varlen | None,
        states: States,
    ) -> torch.Tensor:
        m = self.cfg.dense_block_layers
        x = self.model.embed_tokens(input_ids)  # [N, D]
        past: DenseWindow = []  # the last m layers' pre-fusion k/v, same tokens: transient, never state
        for layer, st in zip(self.model.layers, states):
            if seqs is None:
                x, k_raw, v_raw = layer.decode(x, positions, st["S"], slot_ids, past)
            else:
                x, k_raw, v_raw = layer(x, positions, st["S"], slot_ids, seqs, past)
            if m:
                # Always m entries once layer 0 ran: missing earlier layers are zeros, which add exactly
                # nothing, so every fusing layer runs the same code (one compiled graph for all).
                past = past or [(torch.zeros_like(k_raw), torch.zeros_like(v_raw))] * m
                past = [*past[1:], (k_raw, v_raw)]
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x)).float()

    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        x = self._run(batch.input_ids, batch.positions, batch.slot_ids, batch.varlen, states)
        return self._logits(x[batch.logits_indices])

    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        return self._logits(self._run(batch.input_ids, batch.positions, batch.slot_ids, None, states))
