"""The Transformer baseline: LLaMA-style and GPT-2 decoders served by the same engine as the
recurrent families, so that load tests compare like with like.

It keeps no recurrent state: every layer is an attention layer with a paged KV cache (``kv_specs``),
``[num_blocks, block_size, n_kv_heads, head_dim]`` per layer in the model dtype, owned by the
engine's ``KVCache``. A sequence holds the blocks its tokens fill, so its memory grows with its
length, as a paged Transformer server's does, instead of ``max_model_len`` positions per slot.

Prefill writes each chunk's keys and values into its blocks and attends over the cached prefix plus
the chunk, causally; decode writes one token and attends over ``[0, pos]``; both through
``kernels/paged_attention`` (batched over the whole step, no per-sequence loop). The CPU kernels pad
to the step's longest sequence, a host int, and the engine's CUDA-graph decode does not yet carry the
block tables, so the decode is not captured (``decode_graph_safe = False``; the Triton decode kernel
itself holds no host sync).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.attention import PagedAttention, rope_cos_sin, rope_inv_freq
from rnnserve.models.base import DecodeBatch, KVSpec, PagedKVMetadata, PrefillBatch, RecurrentLM, States, StateSpec
from rnnserve.models.layers import quantize_int8
from rnnserve.models.weights import WeightsMapper, default_weight_loader, load_weights, set_weight_loader


@dataclass(frozen=True)
class TransformerConfig:
    """The handful of numbers both layouts need (LLaMA: RMSNorm, RoPE, gated SiLU MLP, GQA;
    GPT-2: LayerNorm, learned positions, GELU MLP, biases everywhere)."""

    arch: str  # "llama" | "gpt2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"unknown transformer layout {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of kv heads {self.num_kv_heads}")

    @classmethod
    def from_hf(cls, c: dict) -> TransformerConfig:
        if c.get("model_type") == "gpt2" or "n_embd" in c:
            if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
                raise ValueError("GPT-2 attention scaling variants (scale_attn_by_inverse_layer_idx) are not supported")
            d = c["n_embd"]
            return cls(
                arch="gpt2",
                vocab_size=c["vocab_size"],
                hidden_size=d,
                intermediate_size=c.get("n_inner") or 4 * d,
                num_layers=c["n_layer"],
                num_heads=c["n_head"],
                num_kv_heads=c["n_head"],
                head_dim=d // c["n_head"],
                max_position_embeddings=c["n_positions"],
                norm_eps=c.get("layer_norm_epsilon", 1e-5),
                tie_word_embeddings=c.get("tie_word_embeddings", True),
                attention_bias=True,
                mlp_bias=True,
                hidden_act=c.get("activation_function", "gelu_new"),
            )
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"RoPE type {rope_type!r} is not supported by the Transformer baseline (only default)")
        heads = c["num_attention_heads"]
        d = c["hidden_size"]
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported (LLaMA uses silu)")
        return cls(
            arch="llama",
            vocab_size=c["vocab_size"],
            hidden_size=d,
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or d // heads,
            max_position_embeddings=c["max_position_embeddings"],
            norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            attention_bias=c.get("attention_bias", False),
            mlp_bias=c.get("mlp_bias", False),
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as LLaMA does, then cast back before the weight.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm residual: ``self_attn`` over the paged cache, then the MLP. Module names are LLaMA's
    checkpoint names (GPT-2's are mapped onto them)."""

    def __init__(self, cfg: TransformerConfig, backend: Backend) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        norm = (
            (lambda: RMSNorm(d, cfg.norm_eps)) if cfg.arch == "llama" else (lambda: nn.LayerNorm(d, eps=cfg.norm_eps))
        )
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.self_attn = PagedAttention(d, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias, backend)
        self.mlp = nn.Module()
        if cfg.arch == "llama":
            self.mlp.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.mlp.up_proj = nn.Linear(d, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.mlp.down_proj = nn.Linear(cfg.intermediate_size, d, bias=cfg.mlp_bias)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        if self.cfg.arch == "llama":
            return m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
        approximate = "tanh" if self.cfg.hidden_act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast") else "none"
        return m.down_proj(F.gelu(m.up_proj(x), approximate=approximate))


# GPT-2 checkpoint names -> ours (LLaMA's): with and without the ``transformer.`` prefix.
_GPT2_TOPS = (("wte.", "embed_tokens."), ("wpe.", "embed_positions."), ("ln_f.", "norm."), ("h.", "layers."))
_GPT2_MAPPER = WeightsMapper(
    prefixes=tuple((f"transformer.{old}", new) for old, new in _GPT2_TOPS) + _GPT2_TOPS,
    substrings=(
        (".ln_1.", ".input_layernorm."),
        (".ln_2.", ".post_attention_layernorm."),
        (".attn.c_proj.", ".self_attn.o_proj."),
        (".mlp.c_fc.", ".mlp.up_proj."),
        (".mlp.c_proj.", ".mlp.down_proj."),
    ),
    ignore_suffixes=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers of old checkpoints
)


def _split_gpt2_qkv(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """GPT-2's fused ``attn.c_attn`` (Conv1D ``[in, 3 * out]``) as separate q, k, v projections
    (``Linear [out, in]``), named as the mapper's output expects."""
    for name, tensor in weights:
        if ".attn.c_attn." not in name:
            yield name, tensor
            continue
        prefix, kind = name.split(".attn.c_attn.")
        for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=-1)):
            yield f"{prefix}.self_attn.{part}.{kind}", t.t() if kind == "weight" else t


class TransformerLM(RecurrentLM):
    """LLaMA-style or GPT-2 decoder whose per-sequence memory is its paged KV cache."""

    decode_graph_safe = False

    def __init__(self, cfg: TransformerConfig, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        # limit_context lowers this to --max-model-len before the engine sizes the KV cache.
        self.max_model_len = cfg.max_position_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = (
            nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.arch == "gpt2" else None
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend) for _ in range(cfg.num_layers))
        self.norm = (
            RMSNorm(cfg.hidden_size, cfg.norm_eps)
            if cfg.arch == "llama"
            else nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> TransformerLM:
        return cls(TransformerConfig.from_hf(config), backend)

    def post_load(self) -> None:
        # The loader casts the module to the model dtype; RoPE frequencies must stay fp32.
        self.inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.device)

    def limit_context(self, max_model_len: int) -> None:
        self.max_model_len = min(self.max_model_len, max_model_len)

    def state_specs(self) -> list[list[StateSpec]]:
        return [[] for _ in range(self.cfg.num_layers)]

    def kv_specs(self) -> list[KVSpec]:
        return [KVSpec(self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype) for _ in range(self.cfg.num_layers)]

    # ----------------------------------------------------------------- weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = ("lm_head.weight",) if self.cfg.tie_word_embeddings else ()
        if self.cfg.arch == "llama":
            mapper = WeightsMapper(prefixes=(("model.", ""),), ignore_suffixes=("rotary_emb.inv_freq", *tied))
            return load_weights(self, weights, mapper)
        # GPT-2's Conv1D stores [in, out]: its output projections load transposed.
        for layer in self.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                set_weight_loader(linear.weight, _load_transposed)
        mapper = dataclasses.replace(_GPT2_MAPPER, ignore_suffixes=_GPT2_MAPPER.ignore_suffixes + tied)
        return load_weights(self, _split_gpt2_qkv(weights), mapper)

    def quantize_int8(self) -> None:
        """int8 q/k/v/o, the MLP's projections and the head (every matrix but the embedding, which stays
        fp32 for lookups, also where the head is tied to it); norms and the KV cache stay fp32."""
        for layer in self.layers:
            for module in (layer.self_attn, layer.mlp):
                for name, child in list(module.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(module, name, quantize_int8(child))
        self.lm_head = quantize_int8(self.lm_head)

    # ----------------------------------------------------------------- forward

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin [N, 1, hd] for LLaMA; None for GPT-2 (learned positions)."""
        if self.cfg.arch != "llama":
            return None
        return rope_cos_sin(positions, self.inv_freq, self.dtype)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            h = h + self.embed_positions(positions)
        return h

    def _kv(self, kv: PagedKVMetadata | None) -> PagedKVMetadata:
        """The step's paged-cache metadata; positions past ``max_model_len`` are refused (RoPE and
        learned positions are only defined up to it). Host ints only: no device sync."""
        if kv is None:
            raise ValueError("the Transformer baseline needs the batch's paged KV cache metadata (batch.kv)")
        if kv.max_seq_len > self.max_model_len:
            raise ValueError(f"position {kv.max_seq_len - 1} is beyond max_model_len {self.max_model_len}")
        return kv

    @torch.no_grad()
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        kv = self._kv(batch.kv)
        rope = self._rope(batch.positions)
        h = self._embed(batch.input_ids, batch.positions)  # [T, D]
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn.prefill(layer.input_layernorm(h), rope, kv, i, batch.cu_seqlens)
            h = h + layer.feed_forward(layer.post_attention_layernorm(h))
        h = self.norm(h[batch.logits_indices])
        return self.lm_head(h).float()

    @torch.no_grad()
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        kv = self._kv(batch.kv)
        rope = self._rope(batch.positions)
        h = self._embed(batch.input_ids, batch.positions)  # [B, D]
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn.decode(layer.input_layernorm(h), rope, kv, i)
            h = h + layer.feed_forward(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h)).float()


@torch.no_grad()
def _load_transposed(param: nn.Parameter, tensor: torch.Tensor) -> None:
    default_weight_loader(param, tensor.t())
