"""Zamba2 (Zyphra): transformers' ``Zamba2ForCausalLM`` checkpoints. Mamba-2 layers, some of which
("hybrid" in ``layers_block_type``) first run one of a few *shared* transformer blocks.

Every layer is a Mamba-2 layer (``models/mamba2.py``'s mixer, Δ clamped below at ``time_step_min``)
with a pre-RMSNorm residual. A hybrid layer adds the output of a shared block, projected by its own
``linear``, to the Mamba layer's input (not to the residual stream)::

    e  = embed(ids)                                          # [T, D], kept for every hybrid layer
    t  = linear_i(block_b(h, e, j))                          # hybrid layers only, else t = 0
    h += mamba_i(input_layernorm_i(h + t))

    block_b(h, e, j):                                        # no residual inside
        x = input_layernorm(concat(h, e))                    # [T, 2D]
        a = attention(q_proj(x) + Aq_j(x), k_proj(x) + Ak_j(x), v_proj(x) + Av_j(x))   -> o_proj [T, D]
        y = pre_ff_layernorm(a)
        return down_proj(act(gate) ⊙ up),  gate, up = gate_up_proj(y) + Agu_j(y)

``j`` counts the hybrid layers (0, 1, ...) and selects block ``b = j mod num_mem_blocks``; the weights
of a block are shared by every position that runs it (transformers 5 ties them only when
``tie_word_embeddings`` is set; otherwise every position has a block of its own, and so do we), but
each position keeps its own low-rank
adapters (``A_j(x) = W2_j W1_j x``, rank ``adapter_rank``; on q/k/v only with
``use_shared_attention_adapter``, on the MLP's gate/up always) and, since it attends over its own
inputs, its **own keys and values**. So per layer a sequence keeps Mamba-2's state (``conv [E + 2GN,
K-1]``, ``ssm [H, N, P]`` fp32), and a hybrid layer also declares a KV spec: one paged KV cache per
hybrid position (``kv_specs`` in layer order), exactly as transformers' cache keeps a KV per hybrid
layer index. Attention: heads of ``head_dim = 2D / num_attention_heads``, scores scaled by
``(head_dim / 2) ** -0.5``, full-width RoPE with ``use_mem_rope``, no biases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.attention import PagedAttention, apply_rope, rope_cos_sin, rope_inv_freq
from rnnserve.models.bamba import BambaLM
from rnnserve.models.base import (
    DecodeBatch,
    KVSpec,
    PagedKVMetadata,
    PrefillBatch,
    RecurrentLM,
    States,
    StateSpec,
)
from rnnserve.models.layers import RMSNorm, lm_logits
from rnnserve.models.mamba2 import Mamba2Config, Mamba2Mixer
from rnnserve.models.weights import WeightsMapper, default_weight_loader, load_weights, set_weight_loader

_MAMBA = ("mamba", "linear_attention")
_HYBRID = "hybrid"
# transformers' ACT2FN names for the shared MLP's activation
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}
_ROPE = tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class Zamba2Config:
    """The numbers a ``Zamba2Config`` config.json fixes."""

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # of the shared blocks' MLP
    num_layers: int
    hybrid_layer_indices: tuple[int, ...]
    num_mem_blocks: int  # shared blocks; hybrid layer j runs block j mod num_mem_blocks
    num_heads: int
    num_kv_heads: int
    head_dim: int  # 2D / num_heads
    attention_adapters: bool  # use_shared_attention_adapter
    adapter_rank: int
    rope: bool  # use_mem_rope
    rope_theta: float
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    mamba: Mamba2Config
    add_bias_linear: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.num_mem_blocks < 1:
            raise ValueError(f"zamba2: num_mem_blocks must be >= 1, got {self.num_mem_blocks}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"zamba2: num_attention_heads {self.num_heads} is not a multiple of {self.num_kv_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"zamba2: hidden_act {self.hidden_act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        if self.attention_adapters and not (
            self.num_kv_heads == self.num_heads and self.num_heads * self.head_dim == 2 * self.hidden_size
        ):
            # The q/k/v adapters map 2D -> 2D and are added to the projections (transformers fails too).
            raise ValueError(
                "zamba2: use_shared_attention_adapter needs num_key_value_heads == num_attention_heads and "
                f"2 * hidden_size divisible by num_attention_heads (got {self.num_kv_heads} KV heads of "
                f"{self.num_heads}, 2 * hidden_size = {2 * self.hidden_size})"
            )

    @property
    def attention_hidden_size(self) -> int:
        return 2 * self.hidden_size

    @property
    def num_blocks(self) -> int:
        """Transformer blocks held: num_mem_blocks shared ones, or one per hybrid position when
        transformers unties them (its ``_tied_weights_keys`` apply only with ``tie_word_embeddings``)."""
        hybrid = len(self.hybrid_layer_indices)
        return min(self.num_mem_blocks, hybrid) if self.tie_word_embeddings else hybrid

    def block_of(self, j: int) -> int:
        """The block hybrid position j runs."""
        return j % self.num_mem_blocks if self.tie_word_embeddings else j

    @classmethod
    def from_hf(cls, c: dict) -> Zamba2Config:
        layers = c["num_hidden_layers"]
        types = c.get("layers_block_type") or c.get("layer_types")
        if not types:
            raise ValueError("zamba2: the config has no layers_block_type")
        unknown = sorted({t for t in types if t not in (*_MAMBA, _HYBRID)})
        if unknown or len(types) != layers:
            raise ValueError(f"zamba2: layers_block_type must be {layers} of mamba/hybrid, got {types}")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if c.get("use_mem_rope") and rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError("zamba2: only the default RoPE type is supported")
        hidden, heads = c["hidden_size"], c["num_attention_heads"]
        inner = int(c.get("mamba_expand", 2) * hidden)
        m_heads = c.get("n_mamba_heads", 8)
        if inner % m_heads:
            raise ValueError(
                f"zamba2: mamba_expand * hidden_size ({inner}) is not a multiple of n_mamba_heads {m_heads}"
            )
        mamba = Mamba2Config(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            num_layers=layers,
            num_heads=m_heads,
            head_dim=inner // m_heads,
            state_size=c.get("mamba_d_state", 64),
            n_groups=c.get("mamba_ngroups", 1),
            conv_kernel=c.get("mamba_d_conv", 4),
            norm_eps=1e-5,  # transformers hard-codes the gated norm's eps for Zamba2
            use_bias=c.get("add_bias_linear", False),
            use_conv_bias=True,  # transformers builds the conv with a bias whatever use_conv_bias says
            residual_in_fp32=False,
            time_step_limit=(float(c.get("time_step_min", 0.001)), math.inf),
        )
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            intermediate_size=c.get("intermediate_size") or 4 * hidden,
            num_layers=layers,
            hybrid_layer_indices=tuple(i for i, t in enumerate(types) if t == _HYBRID),
            num_mem_blocks=c.get("num_mem_blocks", 1),
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=2 * hidden // heads,
            attention_adapters=c.get("use_shared_attention_adapter", False),
            adapter_rank=c.get("adapter_rank", 128),
            rope=c.get("use_mem_rope", False),
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            # transformers 5 sets 16384 for use_long_context (and nothing else changes).
            max_position_embeddings=16384 if c.get("use_long_context") else c.get("max_position_embeddings", 4096),
            norm_eps=c.get("rms_norm_eps", 1e-5),
            hidden_act=c.get("hidden_act", "gelu"),
            mamba=mamba,
            add_bias_linear=c.get("add_bias_linear", False),
            tie_word_embeddings=c.get("tie_word_embeddings", True),
        )


def _adapter_list(cfg: Zamba2Config, block: int, width_in: int, width_out: int) -> nn.ModuleList:
    """One low-rank adapter per hybrid position, as transformers lays them out: entry j is
    ``Linear(in, r), Linear(r, out)`` when j mod num_mem_blocks == block mod num_mem_blocks (the
    positions a shared block runs at), a placeholder otherwise, so the checkpoint's
    ``..._adapter_list.{j}.{0,1}.weight`` names match. (An untied block at position j also holds the
    adapters of the other positions of its residue class, unused, as transformers does.)"""
    return nn.ModuleList(
        nn.Sequential(
            nn.Linear(width_in, cfg.adapter_rank, bias=False), nn.Linear(cfg.adapter_rank, width_out, bias=False)
        )
        if j % cfg.num_mem_blocks == block % cfg.num_mem_blocks
        else nn.Identity()
        for j in range(len(cfg.hybrid_layer_indices))
    )


class Zamba2SharedAttention(PagedAttention):
    """q/k/v from the 2D-wide concat(h, e), o_proj back to D; per-position adapters on q/k/v."""

    def __init__(self, cfg: Zamba2Config, block: int, backend: Backend) -> None:
        width = cfg.attention_hidden_size
        super().__init__(
            width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, False, backend, scale=(cfg.head_dim / 2) ** -0.5
        )
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)  # to D, not 2D
        self.adapters = cfg.attention_adapters
        if cfg.attention_adapters:
            self.linear_q_adapter_list = _adapter_list(cfg, block, width, width)
            self.linear_k_adapter_list = _adapter_list(cfg, block, width, width)
            self.linear_v_adapter_list = _adapter_list(cfg, block, width, width)

    def qkv_at(self, j: int, x: torch.Tensor, rope: _ROPE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, 2D] at hybrid position j -> q [N, H, hd], k and v [N, Hkv, hd], RoPE (if any) applied."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.adapters:
            q = q + self.linear_q_adapter_list[j](x)
            k = k + self.linear_k_adapter_list[j](x)
            v = v + self.linear_v_adapter_list[j](x)
        n = x.shape[0]
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if rope is None:
            return q, k, v
        return apply_rope(q, *rope), apply_rope(k, *rope), v


class Zamba2SharedMLP(nn.Module):
    def __init__(self, cfg: Zamba2Config, block: int) -> None:
        super().__init__()
        d, inter = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Linear(d, 2 * inter, bias=cfg.add_bias_linear)
        self.down_proj = nn.Linear(inter, d, bias=cfg.add_bias_linear)
        self.gate_up_proj_adapter_list = _adapter_list(cfg, block, d, 2 * inter)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] at hybrid position j -> [N, D]."""
        gate, up = (self.gate_up_proj(x) + self.gate_up_proj_adapter_list[j](x)).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Zamba2SharedBlock(nn.Module):
    """One shared transformer block (checkpoint: ``model.layers.{i}.shared_transformer.*`` of the
    hybrid layers that run it)."""

    def __init__(self, cfg: Zamba2Config, block: int, backend: Backend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.attention_hidden_size, cfg.norm_eps)
        self.self_attn = Zamba2SharedAttention(cfg, block, backend)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = Zamba2SharedMLP(cfg, block)

    def attention_input(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.input_layernorm(torch.cat([h, e], dim=-1))  # [N, 2D]

    def ff(self, j: int, a: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(j, self.pre_ff_layernorm(a))


class Zamba2MambaLayer(nn.Module):
    """``model.layers.{i}`` of a Mamba layer, ``model.layers.{i}.mamba_decoder`` of a hybrid one."""

    def __init__(self, cfg: Zamba2Config, backend: Backend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mamba = Mamba2Mixer(cfg.mamba, backend)


class Zamba2HybridLayer(nn.Module):
    """A hybrid position's own weights: the projection of the shared block's output and its Mamba layer."""

    def __init__(self, cfg: Zamba2Config, backend: Backend) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.mamba_decoder = Zamba2MambaLayer(cfg, backend)


class Zamba2Backbone(nn.Module):
    def __init__(self, cfg: Zamba2Config, backend: Backend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        hybrid = set(cfg.hybrid_layer_indices)
        self.layers = nn.ModuleList(
            Zamba2HybridLayer(cfg, backend) if i in hybrid else Zamba2MambaLayer(cfg, backend)
            for i in range(cfg.num_layers)
        )
        # Not in the checkpoint under this name: the loader maps each hybrid layer's shared_transformer here.
        self.blocks = nn.ModuleList(Zamba2SharedBlock(cfg, b, backend) for b in range(cfg.num_blocks))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Zamba2LM(RecurrentLM):
    """Zamba2 causal LM; module names follow transformers (``model.*``, ``lm_head``), except the shared
    blocks, held once in ``model.blocks`` (see ``load_weights``)."""

    decode_graph_safe = False  # the attention layers' decode reads host ints on the CPU path

    def __init__(self, cfg: Zamba2Config, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        # RoPE is defined up to max_position_embeddings; limit_context lowers it to --max-model-len.
        self.max_model_len = cfg.max_position_embeddings
        self.model = Zamba2Backbone(cfg, backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
        # Hybrid layer i is position j = self._hybrid[i]: its adapters, block cfg.block_of(j) and
        # its KV cache kv.caches[j].
        self._hybrid = {layer: j for j, layer in enumerate(cfg.hybrid_layer_indices)}
        self._shared_filled: set[int] = set()  # ids of shared-block parameters filled (see load_weights)

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> Zamba2LM:
        return cls(Zamba2Config.from_hf(config), backend)

    def limit_context(self, max_model_len: int) -> None:
        self.max_model_len = min(self.max_model_len, max_model_len)

    def _mamba_layers(self) -> list[Zamba2MambaLayer]:
        return [layer.mamba_decoder if isinstance(layer, Zamba2HybridLayer) else layer for layer in self.model.layers]

    def state_specs(self) -> list[list[StateSpec]]:
        m = self.cfg.mamba
        conv = StateSpec("conv", (m.conv_dim, m.conv_kernel - 1), self.dtype)
        ssm = StateSpec("ssm", (m.num_heads, m.state_size, m.head_dim), torch.float32)
        return [[conv, ssm] for _ in range(self.cfg.num_layers)]  # every layer, hybrid ones too, is Mamba-2

    def kv_specs(self) -> list[KVSpec]:
        return [KVSpec(self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype) for _ in self.cfg.hybrid_layer_indices]

    # ------------------------------------------------------------------ loading

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names are transformers': a shared block's tensors appear under the
        ``shared_transformer`` of the hybrid layers that run it, once (``save_pretrained`` keeps the
        first of tied tensors) or at every such layer (then each copy must equal the first)."""
        for layer in self._mamba_layers():
            BambaLM.keep_fp32_ssm_params(layer.mamba)
        for param in self.model.blocks.parameters():
            set_weight_loader(param, self._load_shared)
        renames = tuple(
            (f"model.layers.{i}.shared_transformer.", f"model.blocks.{self.cfg.block_of(j)}.")
            for j, i in enumerate(self.cfg.hybrid_layer_indices)
        )
        ignore = ("lm_head.weight",) if self.cfg.tie_word_embeddings else ()
        return load_weights(self, weights, WeightsMapper(substrings=renames, ignore_suffixes=ignore))

    @torch.no_grad()
    def _load_shared(self, param: nn.Parameter, tensor: torch.Tensor) -> None:
        if id(param) not in self._shared_filled:
            default_weight_loader(param, tensor)
            self._shared_filled.add(id(param))
        elif not torch.equal(param, tensor.to(param.device, param.dtype)):
            raise ValueError("two hybrid layers' copies of this shared-block tensor differ (they must be tied)")

    def post_load(self) -> None:
        self._shared_filled = set()
        # The loader casts the module to the model dtype; RoPE frequencies must stay fp32.
        self.inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.device)

    # ------------------------------------------------------------------ forward

    def _kv(self, kv: PagedKVMetadata | None) -> PagedKVMetadata | None:
        if not self._hybrid:
            return None
        if kv is None:
            raise ValueError("the hybrid layers need the batch's paged KV cache metadata (batch.kv)")
        if kv.max_seq_len > self.max_model_len:
            raise ValueError(f"position {kv.max_seq_len - 1} is beyond max_model_len {self.max_model_len}")
        return kv

    def _rope(self, positions: torch.Tensor) -> _ROPE:
        return rope_cos_sin(positions, self.inv_freq, self.dtype) if self.cfg.rope else None

    def _block(self, j: int) -> Zamba2SharedBlock:
        return self.model.blocks[self.cfg.block_of(j)]

    @staticmethod
    def _mamba_input(layer: nn.Module, h: torch.Tensor, t: torch.Tensor | None) -> tuple[Mamba2Mixer, torch.Tensor]:
        """Layer i's mixer and its input: input_layernorm(h) for a Mamba layer, input_layernorm(h +
        linear(t)) for a hybrid one, t [N, D] its shared block's output."""
        if t is None:
            return layer.mamba, layer.input_layernorm(h)
        return layer.mamba_decoder.mamba, layer.mamba_decoder.input_layernorm(h + layer.linear(t))

    def _shared_block(
        self, i: int, h: torch.Tensor, e: torch.Tensor, rope: _ROPE, attend: Callable[..., torch.Tensor]
    ) -> torch.Tensor | None:
        """Layer i's shared-block output [N, D] (None for a Mamba layer): its shared block on
        concat(h, e) at hybrid position j, attention through ``attend(attn, q, k, v, j)`` (the prefill
        or the decode kernel over position j's KV blocks)."""
        if i not in self._hybrid:
            return None
        j = self._hybrid[i]
        block = self._block(j)
        q, k, v = block.self_attn.qkv_at(j, block.attention_input(h, e), rope)
        return block.ff(j, attend(block.self_attn, q, k, v, j))

    @torch.no_grad()
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        kv, rope = self._kv(batch.kv), self._rope(batch.positions)
        e = self.model.embed_tokens(batch.input_ids)  # [T, D]
        h = e

        def attend(attn: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, j: int) -> torch.Tensor:
            return attn.attend_prefill(q, k, v, kv, j, batch.cu_seqlens)

        for i, (layer, st) in enumerate(zip(self.model.layers, states)):
            t = self._shared_block(i, h, e, rope, attend)  # [T, D] or None
            mamba, x = self._mamba_input(layer, h, t)
            h = h + mamba.prefill(x, st["conv"], st["ssm"], batch)
        return self._logits(h.index_select(0, batch.logits_indices))

    @torch.no_grad()
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        kv, rope = self._kv(batch.kv), self._rope(batch.positions)
        e = self.model.embed_tokens(batch.input_ids)  # [B, D]
        h = e

        def attend(attn: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, j: int) -> torch.Tensor:
            return attn.attend_decode(q, k, v, kv, j)

        for i, (layer, st) in enumerate(zip(self.model.layers, states)):
            t = self._shared_block(i, h, e, rope, attend)  # [B, D] or None
            mamba, x = self._mamba_input(layer, h, t)
            h = h + mamba.decode(x, st["conv"], st["ssm"], batch.slot_ids)
        return self._logits(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.model.final_layernorm(h), self.lm_head)
