"""NVIDIA Nemotron-H: transformers' ``NemotronHForCausalLM`` checkpoints (Nemotron-H, Nemotron-Nano-2,
Nemotron 3 with MoE).

Each layer is one pre-RMSNorm residual block, ``h += mixer(norm(h))``, whose mixer is chosen per layer
by ``layers_block_type`` (older configs: ``hybrid_override_pattern``, one character per layer):

    "M"  linear_attention   Mamba-2 (SSD): ``models/mamba2.py``'s mixer (grouped gated RMSNorm)
    "*"  full_attention     causal self-attention, GQA, no positional encoding at all, no biases
    "-"  mlp                up_proj -> relu² -> down_proj (no gate)
    "E"  moe                sigmoid-scored top-k over relu² experts (grouped routing, a correction
                            bias, optional latent projection) plus one relu² shared expert

So per layer a sequence keeps a Mamba-2 state in the state pool (``conv [E + 2GN, K-1]``,
``ssm [H, N, P]`` fp32), keys and values in the paged KV cache (one ``KVSpec`` per attention layer, in
layer order), or nothing (MLP and MoE layers). Then ``norm_f`` and an untied ``lm_head``.

As transformers 5.x does: Δ is clamped below at ``time_step_min`` (``time_step_limit`` is not read);
``residual_in_fp32`` is not read (the residual stream stays in the model dtype); the RMSNorms multiply
by their weight in fp32; the router (``gate.weight``, ``gate.e_score_correction_bias``) stays fp32;
multi-token-prediction weights (``mtp.*``) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.attention import PagedAttention
from rnnserve.models.base import (
    DecodeBatch,
    KVSpec,
    PagedKVMetadata,
    PrefillBatch,
    RecurrentLM,
    States,
    StateSpec,
)
from rnnserve.models.layers import lm_logits
from rnnserve.models.mamba2 import Mamba2Config, Mamba2Mixer, _json_float
from rnnserve.models.moe import grouped_experts
from rnnserve.models.weights import WeightsMapper, fp32_weight_loader, load_weights, set_weight_loader

MAMBA, ATTENTION, MLP, MOE = "mamba", "attention", "mlp", "moe"
# layers_block_type names (current and legacy) and hybrid_override_pattern characters -> block kind
_BLOCK_TYPES = {
    "linear_attention": MAMBA,
    "mamba": MAMBA,
    "full_attention": ATTENTION,
    "attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
}
_PATTERN = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}


@dataclass(frozen=True)
class NemotronHConfig:
    """The numbers a ``NemotronHConfig`` config.json fixes."""

    vocab_size: int
    hidden_size: int
    blocks: tuple[str, ...]  # per layer: mamba / attention / mlp / moe
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    intermediate_size: int  # of the MLP layers
    mlp_bias: bool
    mamba: Mamba2Config  # the Mamba-2 mixers' numbers
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"nemotron_h: num_attention_heads {self.num_heads} is not a multiple of {self.num_kv_heads}"
            )
        if MOE in self.blocks:
            e, g = self.num_experts, self.n_group
            if e < 1 or e % g or e // g < 2 or not 1 <= self.topk_group <= g:
                raise ValueError(
                    f"nemotron_h: {e} experts in n_group {g} groups (at least 2 each), topk_group "
                    f"{self.topk_group}: not a valid MoE routing"
                )
            if not 1 <= self.top_k <= e:
                raise ValueError(f"nemotron_h: num_experts_per_tok {self.top_k} is not in 1..{e}")

    @property
    def attn_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blocks) if b == ATTENTION)

    @classmethod
    def from_hf(cls, c: dict) -> NemotronHConfig:
        def key(name: str, legacy: str, default: object) -> object:
            """transformers' NemotronHConfig accepts the older ``mamba_*`` names for some keys."""
            return c[name] if name in c else c.get(legacy, default)

        blocks = _blocks(c)
        for act_key, want in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")):
            if c.get(act_key, want) != want:
                raise ValueError(f"nemotron_h: {act_key} {c[act_key]!r} is not supported (only {want})")
        hidden, heads = c["hidden_size"], c.get("num_attention_heads", 32)
        eps = c.get("layer_norm_epsilon", 1e-5)
        time_step_min = _json_float(key("time_step_min", "mamba_dt_min", 0.001))
        mamba = Mamba2Config(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            num_layers=len(blocks),
            num_heads=c.get("mamba_num_heads", 128),
            head_dim=c.get("mamba_head_dim", 64),
            state_size=c.get("ssm_state_size", 128),
            n_groups=key("n_groups", "mamba_n_groups", 8),
            conv_kernel=key("conv_kernel", "mamba_d_conv", 4),
            norm_eps=eps,
            use_bias=c.get("use_bias", False),
            use_conv_bias=key("use_conv_bias", "mamba_conv_bias", True),
            residual_in_fp32=False,
            # transformers 5.x clamps Δ to [time_step_min, inf) and never reads time_step_limit.
            time_step_limit=(time_step_min, float("inf")),
        )
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            blocks=blocks,
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            norm_eps=eps,
            intermediate_size=c.get("intermediate_size", 21504),
            mlp_bias=c.get("mlp_bias", False),
            mamba=mamba,
            num_experts=c.get("n_routed_experts", c.get("num_local_experts", 8)),
            top_k=c.get("num_experts_per_tok", 2),
            moe_intermediate_size=c.get("moe_intermediate_size", 7688),
            shared_intermediate_size=c.get("moe_shared_expert_intermediate_size", 7688),
            moe_latent_size=c.get("moe_latent_size"),
            n_group=c.get("n_group", 1),
            topk_group=c.get("topk_group", 1),
            norm_topk_prob=c.get("norm_topk_prob", True),
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        )


def _blocks(c: dict) -> tuple[str, ...]:
    """Per-layer block kinds from ``layers_block_type`` (alias ``layer_types``) or, in older configs,
    ``hybrid_override_pattern`` (transformers ignores ``num_hidden_layers`` when either is given)."""
    types = c.get("layers_block_type") or c.get("layer_types")
    if types is not None:
        unknown = sorted({t for t in types if t not in _BLOCK_TYPES})
        if unknown or not types:
            raise ValueError(f"nemotron_h: layers_block_type {types} has unknown types {unknown}")
        return tuple(_BLOCK_TYPES[t] for t in types)
    pattern = c.get("hybrid_override_pattern")
    if not pattern or any(ch not in _PATTERN for ch in pattern):
        raise ValueError(f"nemotron_h: hybrid_override_pattern {pattern!r} is not a string of M, *, - and E")
    return tuple(_PATTERN[ch] for ch in pattern)


class Fp32RMSNorm(nn.Module):
    """Nemotron-H's RMSNorm: normalised and multiplied by its weight in fp32, then cast back."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Relu2MLP(nn.Module):
    """``down_proj(relu(up_proj(x))²)`` (the MLP layers, each expert and the shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


class NemotronHRouter(nn.Module):
    """``gate.weight [E, D]`` and ``gate.e_score_correction_bias [E]`` (checkpoint names), both fp32."""

    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.empty(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> experts [N, k] and their weights [N, k] (fp32).

        Scores s = sigmoid(W x); the choice adds the correction bias and, with n_group > topk_group,
        keeps only the topk_group groups whose two best biased scores sum highest; the weights are the
        chosen experts' unbiased scores, normalised to sum 1 (norm_topk_prob), times routed_scaling_factor."""
        cfg = self.cfg
        n = x.shape[0]
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E]
        choice = scores + self.e_score_correction_bias.float()
        if cfg.topk_group < cfg.n_group:
            per_group = cfg.num_experts // cfg.n_group
            grouped = choice.view(n, cfg.n_group, per_group)  # [N, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(n, cfg.num_experts)
        experts = choice.topk(cfg.top_k, dim=-1).indices  # [N, k]
        weights = scores.gather(1, experts)  # [N, k]
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * cfg.routed_scaling_factor


class NemotronHMoE(nn.Module):
    """Routed relu² experts (``experts.{j}.{up,down}_proj``, on the latent projection when
    ``moe_latent_size`` is set) plus ``shared_experts`` on the block input; models/moe.py groups the
    (token, expert) assignments so each expert runs once on all of its tokens."""

    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        width = cfg.moe_latent_size or cfg.hidden_size
        self.gate = NemotronHRouter(cfg)
        self.experts = nn.ModuleList(
            Relu2MLP(width, cfg.moe_intermediate_size, bias=False) for _ in range(cfg.num_experts)
        )
        self.shared_experts = Relu2MLP(cfg.hidden_size, cfg.shared_intermediate_size, cfg.mlp_bias)
        self.fc1_latent_proj: nn.Linear | None = None
        self.fc2_latent_proj: nn.Linear | None = None
        if cfg.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(cfg.hidden_size, cfg.moe_latent_size, bias=cfg.mlp_bias)
            self.fc2_latent_proj = nn.Linear(cfg.moe_latent_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D]."""
        experts, weights = self.gate(x)
        xl = x if self.fc1_latent_proj is None else self.fc1_latent_proj(x)  # [N, L]
        y = grouped_experts(xl, experts, weights, len(self.experts), lambda e, rows: self.experts[e](rows))
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        return y + self.shared_experts(x)


class NemotronHBlock(nn.Module):
    """``norm`` then one ``mixer`` (checkpoint names); ``kind`` says which."""

    def __init__(self, cfg: NemotronHConfig, kind: str, backend: Backend) -> None:
        super().__init__()
        self.kind = kind
        self.norm = Fp32RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer: nn.Module
        if kind == MAMBA:
            self.mixer = Mamba2Mixer(cfg.mamba, backend)
        elif kind == ATTENTION:
            self.mixer = PagedAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, False, backend)
        elif kind == MLP:
            self.mixer = Relu2MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        else:
            self.mixer = NemotronHMoE(cfg)


class NemotronHBackbone(nn.Module):
    def __init__(self, cfg: NemotronHConfig, backend: Backend) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(NemotronHBlock(cfg, kind, backend) for kind in cfg.blocks)
        self.norm_f = Fp32RMSNorm(cfg.hidden_size, cfg.norm_eps)


class NemotronHLM(RecurrentLM):
    """Nemotron-H causal LM; module names follow the checkpoints (``backbone.*``, ``lm_head``)."""

    decode_graph_safe = False  # the attention layers' decode reads host ints on the CPU path

    def __init__(self, cfg: NemotronHConfig, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        # Attention layers need a KV cache sized by a context limit (lowered to --max-model-len by
        # limit_context); without them the model is purely recurrent and has none.
        self.max_model_len = cfg.max_position_embeddings if cfg.attn_layer_indices else None
        self.backbone = NemotronHBackbone(cfg, backend)
        # Untied even when tie_word_embeddings says otherwise: transformers' NemotronH never ties.
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Attention layer i's cache is kv.caches[self._kv_index[i]].
        self._kv_index = {layer: n for n, layer in enumerate(cfg.attn_layer_indices)}

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> NemotronHLM:
        return cls(NemotronHConfig.from_hf(config), backend)

    def limit_context(self, max_model_len: int) -> None:
        if self.max_model_len is not None:
            self.max_model_len = min(self.max_model_len, max_model_len)

    def state_specs(self) -> list[list[StateSpec]]:
        m = self.cfg.mamba
        conv = StateSpec("conv", (m.conv_dim, m.conv_kernel - 1), self.dtype)
        ssm = StateSpec("ssm", (m.num_heads, m.state_size, m.head_dim), torch.float32)
        return [[conv, ssm] if kind == MAMBA else [] for kind in self.cfg.blocks]

    def kv_specs(self) -> list[KVSpec]:
        return [KVSpec(self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype) for _ in self.cfg.attn_layer_indices]

    # ------------------------------------------------------------------ loading

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for layer in self.backbone.layers:
            if layer.kind == MAMBA:
                layer.mixer.keep_fp32_params()
            elif layer.kind == MOE:
                set_weight_loader(layer.mixer.gate.weight, fp32_weight_loader)
                set_weight_loader(layer.mixer.gate.e_score_correction_bias, fp32_weight_loader)
        # transformers saves ``backbone.*`` (its own modules say ``model.*``); mtp.*: the optional
        # multi-token-prediction head, which serving does not use.
        mapper = WeightsMapper(
            prefixes=(("model.", "backbone."),), ignore_prefixes=("mtp.", "backbone.mtp.", "model.mtp.")
        )
        return load_weights(self, weights, mapper)

    # ------------------------------------------------------------------ forward

    def _kv(self, kv: PagedKVMetadata | None) -> PagedKVMetadata | None:
        if not self._kv_index:
            return None
        if kv is None:
            raise ValueError("the attention layers need the batch's paged KV cache metadata (batch.kv)")
        if self.max_model_len is not None and kv.max_seq_len > self.max_model_len:
            raise ValueError(f"position {kv.max_seq_len - 1} is beyond max_model_len {self.max_model_len}")
        return kv

    @torch.no_grad()
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        kv = self._kv(batch.kv)
        h = self.backbone.embeddings(batch.input_ids)  # [T, D]
        for i, (layer, st) in enumerate(zip(self.backbone.layers, states)):
            x = layer.norm(h)
            if layer.kind == MAMBA:
                h = h + layer.mixer.prefill(x, st["conv"], st["ssm"], batch)
            elif layer.kind == ATTENTION:
                h = h + layer.mixer.prefill(x, None, kv, self._kv_index[i], batch.cu_seqlens)
            else:
                h = h + layer.mixer(x)
        return lm_logits(self.backbone.norm_f(h.index_select(0, batch.logits_indices)), self.lm_head)

    @torch.no_grad()
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        kv = self._kv(batch.kv)
        h = self.backbone.embeddings(batch.input_ids)  # [B, D]
        for i, (layer, st) in enumerate(zip(self.backbone.layers, states)):
            x = layer.norm(h)
            if layer.kind == MAMBA:
                h = h + layer.mixer.decode(x, st["conv"], st["ssm"], batch.slot_ids)
            elif layer.kind == ATTENTION:
                h = h + layer.mixer.decode(x, None, kv, self._kv_index[i])
            else:
                h = h + layer.mixer(x)
        return lm_logits(self.backbone.norm_f(h), self.lm_head)
