"""TII Falcon-H1: transformers' ``FalconH1ForCausalLM`` checkpoints.

Every decoder layer runs a Mamba-2 mixer and causal self-attention side by side on the same
normalised input, each scaled by its μP multipliers, then a gated SiLU MLP::

    h  = embedding_multiplier · embed(ids)
    x  = input_layernorm(h)
    h += ssm_out_multiplier · mamba(ssm_in_multiplier · x)
       + attention_out_multiplier · attention(attention_in_multiplier · x)
    x  = pre_ff_layernorm(h)
    h += down_m · down_proj(up_proj(x) ⊙ silu(gate_m · gate_proj(x)))      [gate_m, down_m] = mlp_multipliers
    logits = lm_head_multiplier · lm_head(final_layernorm(h))

The Mamba-2 mixer is ``models/mamba2.py``'s with three differences: in_proj's output [z, x, B, C, dt]
is scaled section by section by ``ssm_multipliers`` (transformers' "mup vector"); the gated RMSNorm
is optional (``mamba_rms_norm``; without it the output is y ⊙ silu(z)) and normalises before the
gate when ``mamba_norm_before_gate``; out_proj's bias is ``projectors_bias`` (in_proj's is
``mamba_proj_bias``). Its width is ``mamba_d_ssm`` (else ``mamba_expand · hidden_size``).
``mamba_chunk_size`` only sets how transformers chunks its scan; our kernels chunk as they like.

Attention: GQA, RoPE over the whole head, keys scaled by ``key_multiplier``. q·(m k) = m (q·k), so
the multiplier is folded into the score scale (m / sqrt(head_dim)) and the cache holds the unscaled
keys. So every layer keeps both a recurrent state in the state pool (``conv [E + 2GN, K-1]``,
``ssm [H, N, P]`` fp32) and keys and values in the paged KV cache (one ``KVSpec`` per layer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.attention import PagedAttention
from rnnserve.models.bamba import BambaConfig, BambaLM, BambaMLP, hybrid_mamba2_config
from rnnserve.models.base import DecodeBatch, LayerStates, PagedKVMetadata, PrefillBatch, StateSpec
from rnnserve.models.layers import RMSNorm, gated_rms_norm
from rnnserve.models.mamba2 import Mamba2Mixer
from rnnserve.models.weights import WeightsMapper, load_weights

Rope = tuple[torch.Tensor, torch.Tensor] | None


def _multiplier(c: dict, key: str) -> float:
    value = c.get(key)
    return 1.0 if value is None else float(value)


def _multipliers(c: dict, key: str, n: int) -> tuple[float, ...]:
    values = c.get(key)
    if values is None:
        return (1.0,) * n
    if len(values) != n:
        raise ValueError(f"falcon_h1: {key} must have {n} entries, got {values}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class FalconH1Config(BambaConfig):
    """Bamba's numbers (every layer listed in ``attn_layer_indices``, full-width RoPE) plus Falcon-H1's
    multipliers and Mamba options."""

    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    key_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)  # in_proj sections z, x, B, C, dt
    mlp_multipliers: tuple[float, ...] = (1.0, 1.0)  # gate_proj's output, down_proj's output
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = True
    projectors_bias: bool = False  # the Mamba out_proj's bias

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"falcon_h1: num_attention_heads {self.num_heads} is not a multiple of {self.num_kv_heads}"
            )

    @classmethod
    def from_hf(cls, c: dict) -> FalconH1Config:
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"falcon_h1: hidden_act {c['hidden_act']!r} is not supported (only silu)")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"falcon_h1: RoPE type {rope_type!r} is not supported (only default)")
        hidden, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
        eps = c.get("rms_norm_eps", 1e-5)
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            intermediate_size=c["intermediate_size"],
            num_layers=layers,
            attn_layer_indices=tuple(range(layers)),  # every layer also attends
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            max_position_embeddings=c.get("max_position_embeddings", 8192),
            norm_eps=eps,
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            partial_rotary_factor=1.0,
            mamba=hybrid_mamba2_config(c, eps, "falcon_h1"),
            attention_bias=c.get("attention_bias", False),
            mlp_bias=c.get("mlp_bias", False),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            embedding_multiplier=_multiplier(c, "embedding_multiplier"),
            lm_head_multiplier=_multiplier(c, "lm_head_multiplier"),
            attention_in_multiplier=_multiplier(c, "attention_in_multiplier"),
            attention_out_multiplier=_multiplier(c, "attention_out_multiplier"),
            key_multiplier=_multiplier(c, "key_multiplier"),
            ssm_in_multiplier=_multiplier(c, "ssm_in_multiplier"),
            ssm_out_multiplier=_multiplier(c, "ssm_out_multiplier"),
            ssm_multipliers=_multipliers(c, "ssm_multipliers", 5),
            mlp_multipliers=_multipliers(c, "mlp_multipliers", 2),
            mamba_rms_norm=bool(c.get("mamba_rms_norm", False)),
            mamba_norm_before_gate=bool(c.get("mamba_norm_before_gate", True)),
            projectors_bias=bool(c.get("projectors_bias", False)),
        )


class ZxbcdtProjection(nn.Linear):
    """The Mamba in_proj [D -> E + (E + 2GN) + H] whose output is scaled per section by ``mup_vector``
    (``ssm_multipliers`` spread over z, x, B, C, dt), as transformers scales ``zxbcdt``."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mup_vector", torch.ones(out_features), persistent=False)  # [E + C + H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.mup_vector


class FalconH1Mixer(Mamba2Mixer):
    """Mamba-2's mixer (conv, scan and states as ``Mamba2Mixer``) with Falcon-H1's scaled in_proj,
    optional gated norm and separate out_proj bias."""

    def __init__(self, cfg: FalconH1Config, backend: Backend) -> None:
        super().__init__(cfg.mamba, backend)
        m = cfg.mamba
        self.falcon = cfg
        self.in_proj = ZxbcdtProjection(m.hidden_size, m.intermediate_size + m.conv_dim + m.num_heads, m.use_bias)
        self.out_proj = nn.Linear(m.intermediate_size, m.hidden_size, bias=cfg.projectors_bias)
        self.norm = RMSNorm(m.intermediate_size, m.norm_eps) if cfg.mamba_rms_norm else None
        self.set_mup_vector()

    def set_mup_vector(self) -> None:
        """Fill in_proj's per-section multipliers (a derived buffer: rebuilt after loading)."""
        m, mults = self.cfg, self.falcon.ssm_multipliers
        gn = m.n_groups * m.state_size
        sizes = [m.intermediate_size, m.intermediate_size, gn, gn, m.num_heads]  # z, x, B, C, dt
        vec = torch.cat([torch.full((n,), v, dtype=torch.float32) for n, v in zip(sizes, mults)])
        proj = self.in_proj
        proj.mup_vector = vec.to(device=proj.weight.device, dtype=proj.weight.dtype)

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y [T, H, P] (fp32 scan output) + D x, then the gated norm or the bare gate, out_proj -> [T, D]."""
        y = torch.addcmul(y.float(), self.D_f.unsqueeze(-1), x.float()).flatten(1)  # [T, E]
        if self.norm is None:
            y = (y * F.silu(z.float())).to(z.dtype)
        else:
            y = gated_rms_norm(
                y,
                z,
                self.norm.weight,
                self.cfg.norm_eps,
                groups=self.cfg.n_groups,
                norm_before_gate=self.falcon.mamba_norm_before_gate,
            )
        return self.out_proj(y)


class FalconH1MLP(BambaMLP):
    """Bamba's gated SiLU MLP with Falcon-H1's gate and down multipliers."""

    def __init__(self, cfg: FalconH1Config) -> None:
        super().__init__(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.gate_multiplier, self.down_multiplier = cfg.mlp_multipliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(self.gate_proj(x) * self.gate_multiplier)
        return self.down_proj(self.up_proj(x) * gate) * self.down_multiplier


class FalconH1Layer(nn.Module):
    """One decoder layer: ``mamba`` and ``self_attn`` side by side, then ``feed_forward``."""

    def __init__(self, cfg: FalconH1Config, backend: Backend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = FalconH1MLP(cfg)
        self.mamba = FalconH1Mixer(cfg, backend)
        self.self_attn = PagedAttention(
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.attention_bias,
            backend,
            scale=cfg.key_multiplier * cfg.head_dim**-0.5,
        )

    def ff(self, h: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.pre_ff_layernorm(h))


class FalconH1Backbone(nn.Module):
    def __init__(self, cfg: FalconH1Config, backend: Backend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(FalconH1Layer(cfg, backend) for _ in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_layernorm(h)


class FalconH1LM(BambaLM):
    """Falcon-H1 causal LM; module names follow the checkpoints (``model.*``, ``lm_head``). Bamba's
    layer loop, KV bookkeeping (every layer is an attention layer) and loading, with both mixers in
    every layer and Falcon-H1's multipliers."""

    cfg: FalconH1Config

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> FalconH1LM:
        return cls(FalconH1Config.from_hf(config), backend)

    def _backbone(self, cfg: FalconH1Config, backend: Backend) -> FalconH1Backbone:
        return FalconH1Backbone(cfg, backend)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.cfg.embedding_multiplier

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return super()._logits(h) * self.cfg.lm_head_multiplier

    def state_specs(self) -> list[list[StateSpec]]:
        m = self.cfg.mamba
        conv = StateSpec("conv", (m.conv_dim, m.conv_kernel - 1), self.dtype)
        ssm = StateSpec("ssm", (m.num_heads, m.state_size, m.head_dim), torch.float32)
        return [[conv, ssm] for _ in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for layer in self.model.layers:
            self.keep_fp32_ssm_params(layer.mamba)
        ignore = ("lm_head.weight",) if self.cfg.tie_word_embeddings else ()
        return load_weights(self, weights, WeightsMapper(ignore_suffixes=ignore))

    def post_load(self) -> None:
        super().post_load()
        for layer in self.model.layers:
            layer.mamba.set_mup_vector()

    def _mixer_prefill(
        self,
        i: int,
        layer: nn.Module,
        x: torch.Tensor,
        st: LayerStates,
        batch: PrefillBatch,
        kv: PagedKVMetadata | None,
        rope: Rope,
    ) -> torch.Tensor:
        c = self.cfg
        ssm = layer.mamba.prefill(x * c.ssm_in_multiplier, st["conv"], st["ssm"], batch)
        attn = layer.self_attn.prefill(x * c.attention_in_multiplier, rope, kv, self._kv_index[i], batch.cu_seqlens)
        return ssm * c.ssm_out_multiplier + attn * c.attention_out_multiplier

    def _mixer_decode(
        self,
        i: int,
        layer: nn.Module,
        x: torch.Tensor,
        st: LayerStates,
        batch: DecodeBatch,
        kv: PagedKVMetadata | None,
        rope: Rope,
    ) -> torch.Tensor:
        c = self.cfg
        ssm = layer.mamba.decode(x * c.ssm_in_multiplier, st["conv"], st["ssm"], batch.slot_ids)
        attn = layer.self_attn.decode(x * c.attention_in_multiplier, rope, kv, self._kv_index[i])
        return ssm * c.ssm_out_multiplier + attn * c.attention_out_multiplier
