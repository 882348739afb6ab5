"""AI21 Jamba: transformers' ``JambaForCausalLM`` checkpoints, Mamba-1 mixers, a few attention layers
and mixture-of-experts feed-forwards.

Every decoder layer is pre-RMSNorm residual, as Bamba's (``models/bamba.py``)::

    h += mixer(input_layernorm(h))         mixer = attention if i % attn_layer_period == attn_layer_offset
                                                   else Mamba-1
    h += ff(pre_ff_layernorm(h))           ff = MoE if i % expert_layer_period == expert_layer_offset
                                                (and num_experts > 1) else a gated SiLU MLP

The Mamba-1 mixer is ``models/mamba.py``'s with Jamba's three extra RMSNorms on x_proj's outputs
before dt_proj and the scan: ``δ ← dt_layernorm(δ)``, ``B ← b_layernorm(B)``, ``C ← c_layernorm(C)``.
Per layer a sequence keeps either the Mamba-1 state (``conv [E, K-1]`` model dtype, ``ssm [E, N]``
fp32) in the state pool or keys and values in the paged KV cache. Attention has no positional
encoding (no RoPE), GQA, no biases. The MoE router takes the top-k of the softmax over all experts
and leaves those k weights unnormalised (Mixtral's router renormalises; Jamba's does not).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.attention import PagedAttention
from rnnserve.models.bamba import BambaLM, BambaMLP
from rnnserve.models.base import StateSpec
from rnnserve.models.layers import RMSNorm, use_column_major_weight
from rnnserve.models.mamba import MambaConfig, MambaMixer
from rnnserve.models.moe import grouped_experts
from rnnserve.models.weights import ShardRule, WeightsMapper, default_weight_loader, load_weights, set_shard_loader

# Jamba checkpoints store one tensor per expert (``experts.{e}.{gate,up,down}_proj.weight``);
# transformers 5 stacks them in memory as ``experts.gate_up_proj [E, 2I, D]`` and ``down_proj [E, D, I]``,
# the names our parameters have, so a folder with either layout loads.
_EXPERT_SHARDS = (
    ShardRule(r"(?P<moe>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up)_proj\.weight", r"\g<moe>.gate_up_proj"),
    ShardRule(r"(?P<moe>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>down)_proj\.weight", r"\g<moe>.down_proj"),
)


@dataclass(frozen=True)
class JambaConfig:
    """The numbers a ``JambaConfig`` config.json fixes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of the dense MLP and of each expert
    num_layers: int
    attn_layer_indices: tuple[int, ...]
    expert_layer_indices: tuple[int, ...]  # the layers whose feed-forward is the MoE
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    num_experts: int
    top_k: int
    mamba: MambaConfig  # the Mamba-1 mixers' numbers
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"jamba: num_attention_heads {self.num_heads} is not a multiple of {self.num_kv_heads}")
        if self.expert_layer_indices and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"jamba: num_experts_per_tok {self.top_k} is not in 1..num_experts ({self.num_experts})")

    @classmethod
    def from_hf(cls, c: dict) -> JambaConfig:
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"jamba: hidden_act {c['hidden_act']!r} is not supported (only silu)")
        layers = c["num_hidden_layers"]
        attn_period, attn_offset = c.get("attn_layer_period", 8), c.get("attn_layer_offset", 4)
        expert_period, expert_offset = c.get("expert_layer_period", 2), c.get("expert_layer_offset", 1)
        if not 0 <= attn_offset < attn_period:
            raise ValueError(f"jamba: attn_layer_offset {attn_offset} is not in 0..attn_layer_period-1")
        if not 0 <= expert_offset < expert_period:
            raise ValueError(f"jamba: expert_layer_offset {expert_offset} is not in 0..expert_layer_period-1")
        num_experts = c.get("num_experts", c.get("num_local_experts", 16))
        hidden, heads = c["hidden_size"], c["num_attention_heads"]
        eps = c.get("rms_norm_eps", 1e-6)
        rank = c.get("mamba_dt_rank", "auto")
        mamba = MambaConfig(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            num_layers=layers,
            intermediate_size=int(c.get("mamba_expand", 2) * hidden),
            state_size=c.get("mamba_d_state", 16),
            conv_kernel=c.get("mamba_d_conv", 4),
            time_step_rank=0 if rank == "auto" else int(rank),
            norm_eps=eps,
            use_bias=c.get("mamba_proj_bias", False),
            use_conv_bias=c.get("mamba_conv_bias", True),
            residual_in_fp32=False,
            tie_word_embeddings=False,
        )
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            intermediate_size=c["intermediate_size"],
            num_layers=layers,
            attn_layer_indices=tuple(i for i in range(layers) if i % attn_period == attn_offset),
            # transformers builds a MoE only where the layer has more than one expert.
            expert_layer_indices=tuple(
                i for i in range(layers) if i % expert_period == expert_offset and num_experts > 1
            ),
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            max_position_embeddings=c.get("max_position_embeddings", 262144),
            norm_eps=eps,
            num_experts=num_experts,
            top_k=c.get("num_experts_per_tok", 2),
            mamba=mamba,
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


class JambaMambaMixer(MambaMixer):
    """The Mamba-1 mixer plus ``dt_layernorm [R]``, ``b_layernorm [N]``, ``c_layernorm [N]``."""

    def __init__(self, cfg: MambaConfig, backend: Backend) -> None:
        super().__init__(cfg, backend)
        self.dt_layernorm = RMSNorm(cfg.dt_rank, cfg.norm_eps)
        self.b_layernorm = RMSNorm(cfg.state_size, cfg.norm_eps)
        self.c_layernorm = RMSNorm(cfg.state_size, cfg.norm_eps)

    def norm_dt_b_c(
        self, delta: torch.Tensor, b: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.dt_layernorm(delta), self.b_layernorm(b), self.c_layernorm(c)


class JambaMoE(nn.Module):
    """``feed_forward`` of an expert layer: ``router [E, D]``, ``experts.gate_up_proj [E, 2I, D]`` (gate
    rows, then up rows) and ``experts.down_proj [E, D, I]``, grouped by ``models/moe.grouped_experts``."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.experts.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def load_experts_by_shard(self) -> None:
        """Shard hooks that fill the stacked expert weights from per-expert checkpoint tensors
        (``experts.{e}.gate_proj.weight [I, D]``, ``up_proj`` likewise, ``down_proj [D, I]``); call in
        ``load_weights``, as ``set_shard_loader`` says."""
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        num_experts, inter = down.shape[0], down.shape[2]

        @torch.no_grad()
        def load(param: nn.Parameter, tensor: torch.Tensor, shard: dict[str, str]) -> None:
            e = int(shard["expert"])
            if e >= num_experts:
                raise ValueError(f"expert {e} is beyond num_experts {num_experts}")
            rows = {"gate": slice(0, inter), "up": slice(inter, 2 * inter), "down": slice(None)}[shard["proj"]]
            default_weight_loader(param[e, rows], tensor)

        set_shard_loader(gate_up, load, 2 * num_experts)
        set_shard_loader(down, load, num_experts)

    def use_column_major_experts(self) -> None:
        """Store each expert's matrices column-major (``layers.use_column_major_weight`` for the stacked
        [E, out, in] weights): same values and shapes, but on the CPU ``F.linear`` on an expert's few
        rows then reads the weight without repacking it (``scripts/bench_moe.py``)."""
        for param in (self.experts.gate_up_proj, self.experts.down_proj):
            param.data = param.data.transpose(1, 2).contiguous().transpose(1, 2)

    def _expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(xs, self.experts.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(F.silu(gate) * up, self.experts.down_proj[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D]."""
        probs = torch.softmax(self.router(x).float(), dim=-1)  # [N, E] fp32, as transformers
        weights, top_experts = probs.topk(self.top_k, dim=-1)  # [N, k], not renormalised
        return grouped_experts(x, top_experts, weights.to(x.dtype), self.router.out_features, self._expert)


class JambaLayer(nn.Module):
    """One decoder layer; ``mamba`` or ``self_attn`` and ``feed_forward`` as the checkpoint names them."""

    def __init__(self, cfg: JambaConfig, attention: bool, moe: bool, backend: Backend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward: nn.Module = (
            JambaMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k)
            if moe
            else BambaMLP(cfg.hidden_size, cfg.intermediate_size)
        )
        self.is_attention = attention
        if attention:
            self.self_attn = PagedAttention(
                cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, False, backend
            )
        else:
            self.mamba = JambaMambaMixer(cfg.mamba, backend)

    def ff(self, h: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.pre_ff_layernorm(h))


class JambaBackbone(nn.Module):
    def __init__(self, cfg: JambaConfig, backend: Backend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        attn, experts = set(cfg.attn_layer_indices), set(cfg.expert_layer_indices)
        self.layers = nn.ModuleList(JambaLayer(cfg, i in attn, i in experts, backend) for i in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_layernorm(h)


class JambaLM(BambaLM):
    """Jamba causal LM; module names follow the checkpoints (``model.*``, ``lm_head``). Bamba's layer
    loop and KV bookkeeping with Jamba's backbone (Mamba-1 mixers, MoE), no positional encoding, and
    Mamba-1 states."""

    cfg: JambaConfig

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> JambaLM:
        return cls(JambaConfig.from_hf(config), backend)

    def _backbone(self, cfg: JambaConfig, backend: Backend) -> JambaBackbone:
        return JambaBackbone(cfg, backend)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.empty(0, device=device)  # no RoPE

    def _rope(self, positions: torch.Tensor) -> None:
        return None

    def state_specs(self) -> list[list[StateSpec]]:
        m = self.cfg.mamba
        conv = StateSpec("conv", (m.intermediate_size, m.conv_kernel - 1), self.dtype)
        ssm = StateSpec("ssm", (m.intermediate_size, m.state_size), torch.float32)
        return [[] if layer.is_attention else [conv, ssm] for layer in self.model.layers]

    # ------------------------------------------------------------------ loading

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for layer in self.model.layers:
            if not layer.is_attention:
                layer.mamba.keep_fp32_params()
            if isinstance(layer.feed_forward, JambaMoE):
                layer.feed_forward.load_experts_by_shard()
        ignore = ("lm_head.weight",) if self.cfg.tie_word_embeddings else ()
        return load_weights(self, weights, WeightsMapper(ignore_suffixes=ignore, shards=_EXPERT_SHARDS))

    def post_load(self) -> None:
        super().post_load()
        if self.device.type != "cpu":
            return
        # As MambaLM: column-major weights, so F.linear on a decode step's few rows does not repack them.
        for layer in self.model.layers:
            for linear in layer.modules():
                if isinstance(linear, nn.Linear):
                    use_column_major_weight(linear)
            if isinstance(layer.feed_forward, JambaMoE):
                layer.feed_forward.use_column_major_experts()
        if not self.cfg.tie_word_embeddings:
            use_column_major_weight(self.lm_head)
