"""Bamba (IBM): a hybrid of Mamba-2 mixers and a few full-attention layers, transformers'
``BambaForCausalLM`` checkpoints.

Every decoder layer is pre-RMSNorm residual: a mixer, then a gated SiLU MLP::

    h += mixer(input_layernorm(h))          mixer = Mamba-2 (SSD) or causal self-attention
    h += feed_forward(pre_ff_layernorm(h))

``attn_layer_indices`` names the attention layers; every other layer is a Mamba-2 mixer, exactly
``models/mamba2.py``'s (grouped gated RMSNorm, Δ clamped to ``time_step_limit``). So per layer a
sequence keeps either a recurrent state in the state pool (``conv [E + 2GN, K-1]``, ``ssm [H, N, P]``
fp32) or keys and values in the engine's paged KV cache (``kv_specs``: one entry per attention layer,
in layer order). Attention uses RoPE on the first half of each head's dims only (transformers
hard-codes ``partial_rotary_factor = 0.5`` for Bamba), GQA, no biases by default. The residual
stream stays in the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.attention import PagedAttention, rope_cos_sin, rope_inv_freq
from rnnserve.models.base import (
    DecodeBatch,
    KVSpec,
    LayerStates,
    PagedKVMetadata,
    PrefillBatch,
    RecurrentLM,
    States,
    StateSpec,
)
from rnnserve.models.layers import RMSNorm, lm_logits
from rnnserve.models.mamba2 import Mamba2Config, Mamba2Mixer, _json_float
from rnnserve.models.weights import WeightsMapper, load_weights


@dataclass(frozen=True)
class BambaConfig:
    """The numbers a ``BambaConfig`` config.json fixes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of the MLP
    num_layers: int
    attn_layer_indices: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    mamba: Mamba2Config  # the Mamba-2 mixers' numbers
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        bad = [i for i in self.attn_layer_indices if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"bamba: attn_layer_indices {bad} are outside 0..{self.num_layers - 1}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"bamba: num_attention_heads {self.num_heads} is not a multiple of {self.num_kv_heads}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, c: dict) -> BambaConfig:
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"bamba: hidden_act {c['hidden_act']!r} is not supported (only silu)")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"bamba: RoPE type {rope_type!r} is not supported (only default)")
        hidden = c["hidden_size"]
        heads = c["num_attention_heads"]
        eps = c.get("rms_norm_eps", 1e-5)
        mamba = hybrid_mamba2_config(c, eps, "bamba")
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            attn_layer_indices=tuple(sorted(c.get("attn_layer_indices") or ())),
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            max_position_embeddings=c.get("max_position_embeddings", 262144),
            norm_eps=eps,
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            # transformers sets 0.5 for every Bamba config (kept for backward compatibility there).
            partial_rotary_factor=float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5))),
            mamba=mamba,
            attention_bias=c.get("attention_bias", False),
            mlp_bias=c.get("mlp_bias", False),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


def hybrid_mamba2_config(c: dict, eps: float, family: str) -> Mamba2Config:
    """The Mamba-2 mixers' numbers from a hybrid config's ``mamba_*`` keys (Bamba, Granite 4.0-H,
    Falcon-H1; only Falcon-H1 sets the mixer width ``mamba_d_ssm`` apart from ``mamba_expand``)."""
    hidden = c["hidden_size"]
    m_heads = c.get("mamba_n_heads", 128)
    inner = c.get("mamba_d_ssm") or int(c.get("mamba_expand", 2) * hidden)
    m_head_dim = c.get("mamba_d_head", "auto")
    if m_head_dim == "auto":
        m_head_dim = inner // m_heads
    if m_heads * m_head_dim != inner:
        raise ValueError(
            f"{family}: mamba_n_heads * mamba_d_head ({m_heads * m_head_dim}) != the Mamba width "
            f"(mamba_d_ssm, else mamba_expand * hidden_size: {inner})"
        )
    limit = c.get("time_step_limit") or (0.0, math.inf)
    return Mamba2Config(
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        num_layers=c["num_hidden_layers"],
        num_heads=m_heads,
        head_dim=m_head_dim,
        state_size=c.get("mamba_d_state", 256),
        n_groups=c.get("mamba_n_groups", 1),
        conv_kernel=c.get("mamba_d_conv", 4),
        norm_eps=eps,
        use_bias=c.get("mamba_proj_bias", False),
        use_conv_bias=c.get("mamba_conv_bias", True),
        residual_in_fp32=False,
        time_step_limit=(_json_float(limit[0]), _json_float(limit[1])),
    )


class BambaMLP(nn.Module):
    """Gated SiLU MLP ``down(silu(gate(x)) ⊙ up(x))`` (Bamba's and Jamba's ``feed_forward``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BambaLayer(nn.Module):
    """One decoder layer; ``mamba`` or ``self_attn`` as the checkpoint names them."""

    def __init__(self, cfg: BambaConfig, attention: bool, backend: Backend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = BambaMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.is_attention = attention
        if attention:
            self.self_attn = PagedAttention(
                cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias, backend
            )
        else:
            self.mamba = Mamba2Mixer(cfg.mamba, backend)

    def ff(self, h: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.pre_ff_layernorm(h))


class BambaBackbone(nn.Module):
    def __init__(self, cfg: BambaConfig, backend: Backend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        attn = set(cfg.attn_layer_indices)
        self.layers = nn.ModuleList(BambaLayer(cfg, i in attn, backend) for i in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_layernorm(h)


class BambaLM(RecurrentLM):
    """Bamba causal LM; module names follow transformers (``model.*``, ``lm_head``).

    Also the base of the other Mamba-2 + attention hybrids (Granite 4.0-H, Falcon-H1): a subclass
    overrides the backbone, the RoPE width and the scalings (``_backbone``, ``_rotary_dim``, ``_rope``,
    ``_embed``, ``_residual``, ``_logits``) and, for Falcon-H1's parallel mixers, ``_mixer_prefill`` and
    ``_mixer_decode``; the layer loop, KV bookkeeping and loading are shared."""

    decode_graph_safe = False  # the attention layers' decode reads host ints on the CPU path

    def __init__(self, cfg: BambaConfig, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        # RoPE is defined up to max_position_embeddings; limit_context lowers it to --max-model-len.
        self.max_model_len = cfg.max_position_embeddings
        self.model = self._backbone(cfg, backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        # Attention layer i's cache is kv.caches[self._kv_index[i]].
        self._kv_index = {layer: n for n, layer in enumerate(cfg.attn_layer_indices)}

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> BambaLM:
        return cls(BambaConfig.from_hf(config), backend)

    def _backbone(self, cfg: BambaConfig, backend: Backend) -> BambaBackbone:
        return BambaBackbone(cfg, backend)

    def _rotary_dim(self) -> int:
        return self.cfg.rotary_dim

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """The RoPE frequencies [rotary_dim / 2] fp32 (Jamba, without RoPE, has none)."""
        return rope_inv_freq(self._rotary_dim(), self.cfg.rope_theta, device)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return rope_cos_sin(positions, self.inv_freq, self.dtype)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        """A block's output as added to the residual stream (Bamba adds it as it is)."""
        return x

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.model.final_norm(h), self.lm_head)

    def limit_context(self, max_model_len: int) -> None:
        self.max_model_len = min(self.max_model_len, max_model_len)

    def state_specs(self) -> list[list[StateSpec]]:
        m = self.cfg.mamba
        conv = StateSpec("conv", (m.conv_dim, m.conv_kernel - 1), self.dtype)
        ssm = StateSpec("ssm", (m.num_heads, m.state_size, m.head_dim), torch.float32)
        return [[] if layer.is_attention else [conv, ssm] for layer in self.model.layers]

    def kv_specs(self) -> list[KVSpec]:
        return [KVSpec(self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype) for _ in self.cfg.attn_layer_indices]

    # ------------------------------------------------------------------ loading

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for layer in self.model.layers:
            if not layer.is_attention:
                self.keep_fp32_ssm_params(layer.mamba)
        ignore = ("lm_head.weight",) if self.cfg.tie_word_embeddings else ()
        return load_weights(self, weights, WeightsMapper(ignore_suffixes=ignore))

    @staticmethod
    def keep_fp32_ssm_params(mixer: Mamba2Mixer) -> None:
        """A = -exp(A_log), dt_bias and D in fp32 straight from the checkpoint tensors, whatever the
        model dtype (``Mamba2Mixer.keep_fp32_params``'s load hooks)."""
        mixer.keep_fp32_params()

    def post_load(self) -> None:
        # The loader casts the module to the model dtype; RoPE frequencies must stay fp32.
        self.inv_freq = self._inv_freq(self.device)

    # ------------------------------------------------------------------ forward

    def _kv(self, kv: PagedKVMetadata | None) -> PagedKVMetadata | None:
        if not self._kv_index:
            return None
        if kv is None:
            raise ValueError("the attention layers need the batch's paged KV cache metadata (batch.kv)")
        if kv.max_seq_len > self.max_model_len:
            raise ValueError(f"position {kv.max_seq_len - 1} is beyond max_model_len {self.max_model_len}")
        return kv

    def _mixer_prefill(
        self,
        i: int,
        layer: nn.Module,
        x: torch.Tensor,
        st: LayerStates,
        batch: PrefillBatch,
        kv: PagedKVMetadata | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Layer i's mixer on its normalised input x [T, D] -> [T, D] (Falcon-H1 runs both mixers)."""
        if layer.is_attention:
            return layer.self_attn.prefill(x, rope, kv, self._kv_index[i], batch.cu_seqlens)
        return layer.mamba.prefill(x, st["conv"], st["ssm"], batch)

    def _mixer_decode(
        self,
        i: int,
        layer: nn.Module,
        x: torch.Tensor,
        st: LayerStates,
        batch: DecodeBatch,
        kv: PagedKVMetadata | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """As ``_mixer_prefill`` for one token per sequence, x [B, D] -> [B, D]."""
        if layer.is_attention:
            return layer.self_attn.decode(x, rope, kv, self._kv_index[i])
        return layer.mamba.decode(x, st["conv"], st["ssm"], batch.slot_ids)

    @torch.no_grad()
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        kv, rope = self._kv(batch.kv), self._rope(batch.positions)
        h = self._embed(batch.input_ids)  # [T, D]
        for i, (layer, st) in enumerate(zip(self.model.layers, states)):
            h = h + self._residual(self._mixer_prefill(i, layer, layer.input_layernorm(h), st, batch, kv, rope))
            h = h + self._residual(layer.ff(h))
        return self._logits(h.index_select(0, batch.logits_indices))

    @torch.no_grad()
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        kv, rope = self._kv(batch.kv), self._rope(batch.positions)
        h = self._embed(batch.input_ids)  # [B, D]
        for i, (layer, st) in enumerate(zip(self.model.layers, states)):
            h = h + self._residual(self._mixer_decode(i, layer, layer.input_layernorm(h), st, batch, kv, rope))
            h = h + self._residual(layer.ff(h))
        return self._logits(h)
