"""IBM Granite 4.0-H: transformers' ``GraniteMoeHybridForCausalLM`` checkpoints, dense and MoE.

Bamba's layout (``models/bamba.py``: Mamba-2 mixers and a few attention layers, per layer a state
spec or a KV spec) with Granite's multipliers and feed-forward::

    h  = embedding_multiplier · embed(ids)
    h += residual_multiplier · mixer(input_layernorm(h))        mixer = Mamba-2 or attention
    x  = post_attention_layernorm(h)
    h += residual_multiplier · (moe(x) + shared_mlp(x))         (shared_mlp alone when dense)
    logits = lm_head(norm(h)) / logits_scaling

Attention scores are ``attention_multiplier · q·k`` (not 1/sqrt(d)); positions are RoPE when
``position_embedding_type`` is ``"rope"`` and nothing otherwise (Granite 4.0-H uses none).
``shared_mlp``: ``input_linear [2S, D]`` (gate rows, then up rows), ``output_linear [D, S]``; the MoE
is ``models/moe.py`` (top-k softmax router, experts grouped, no per-token loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.attention import PagedAttention, rope_cos_sin
from rnnserve.models.bamba import BambaLM, hybrid_mamba2_config
from rnnserve.models.layers import RMSNorm
from rnnserve.models.mamba2 import Mamba2Config, Mamba2Mixer
from rnnserve.models.moe import MoE

_ATTENTION = ("attention", "full_attention")
_MAMBA = ("mamba", "linear_attention")


@dataclass(frozen=True)
class GraniteHybridConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    attn_layer_indices: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope: bool
    rope_theta: float
    embedding_multiplier: float
    residual_multiplier: float
    attention_multiplier: float
    logits_scaling: float
    shared_intermediate_size: int
    intermediate_size: int  # of each expert
    num_experts: int  # 0: dense (shared MLP only)
    top_k: int
    mamba: Mamba2Config
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, c: dict) -> GraniteHybridConfig:
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"granitemoehybrid: hidden_act {c['hidden_act']!r} is not supported (only silu)")
        layers = c["num_hidden_layers"]
        types = c.get("layer_types") or c.get("layers_block_type") or ["mamba"] * layers
        unknown = sorted({t for t in types if t not in _ATTENTION + _MAMBA})
        if unknown or len(types) != layers:
            raise ValueError(f"granitemoehybrid: layer_types must be {layers} of mamba/attention, got {types}")
        position = c.get("position_embedding_type")
        if position not in (None, "nope", "rope"):
            raise ValueError(f"granitemoehybrid: position_embedding_type {position!r} is not supported")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if position == "rope" and rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError("granitemoehybrid: only the default RoPE type is supported")
        hidden, heads = c["hidden_size"], c["num_attention_heads"]
        eps = c.get("rms_norm_eps", 1e-6)
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            num_layers=layers,
            attn_layer_indices=tuple(i for i, t in enumerate(types) if t in _ATTENTION),
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            max_position_embeddings=c.get("max_position_embeddings", 131072),
            norm_eps=eps,
            rope=position == "rope",
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            embedding_multiplier=float(c.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(c.get("residual_multiplier", 1.0)),
            attention_multiplier=float(c.get("attention_multiplier", 1.0)),
            logits_scaling=float(c.get("logits_scaling", 1.0)),
            shared_intermediate_size=c.get("shared_intermediate_size", 1024),
            intermediate_size=c.get("intermediate_size", 1024),
            num_experts=c.get("num_local_experts") or 0,
            top_k=c.get("num_experts_per_tok") or 0,
            mamba=hybrid_mamba2_config(c, eps, "granitemoehybrid"),
            attention_bias=c.get("attention_bias", False),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


class SharedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.input_linear = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.output_linear = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(F.silu(gate) * up)


class GraniteHybridLayer(nn.Module):
    def __init__(self, cfg: GraniteHybridConfig, attention: bool, backend: Backend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.shared_mlp = SharedMLP(cfg.hidden_size, cfg.shared_intermediate_size)
        self.block_sparse_moe = (
            MoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k) if cfg.num_experts else None
        )
        self.is_attention = attention
        if attention:
            self.self_attn = PagedAttention(
                cfg.hidden_size,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                cfg.attention_bias,
                backend,
                scale=cfg.attention_multiplier,
            )
        else:
            self.mamba = Mamba2Mixer(cfg.mamba, backend)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared_mlp(x)
        return out if self.block_sparse_moe is None else out + self.block_sparse_moe(x)

    def ff(self, h: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.post_attention_layernorm(h))


class GraniteHybridBackbone(nn.Module):
    def __init__(self, cfg: GraniteHybridConfig, backend: Backend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        attn = set(cfg.attn_layer_indices)
        self.layers = nn.ModuleList(GraniteHybridLayer(cfg, i in attn, backend) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class GraniteMoeHybridLM(BambaLM):
    """Granite 4.0-H causal LM; module names follow the checkpoints (``model.*``, ``lm_head``). Bamba's
    layer loop, KV bookkeeping and loading, with Granite's backbone, optional RoPE and multipliers."""

    cfg: GraniteHybridConfig

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> GraniteMoeHybridLM:
        return cls(GraniteHybridConfig.from_hf(config), backend)

    def _backbone(self, cfg: GraniteHybridConfig, backend: Backend) -> GraniteHybridBackbone:
        return GraniteHybridBackbone(cfg, backend)

    def _rotary_dim(self) -> int:
        return self.cfg.head_dim

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return rope_cos_sin(positions, self.inv_freq, self.dtype) if self.cfg.rope else None

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.cfg.embedding_multiplier

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.cfg.residual_multiplier * x

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return super()._logits(h) / self.cfg.logits_scaling
