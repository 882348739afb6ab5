"""The Transformer baseline: LLaMA-style and GPT-2 decoders served by the same engine as the
recurrent families, so that load tests compare like with like.

Its per-sequence "state" is a KV cache: per layer ``k`` and ``v`` of ``[max_model_len, n_kv_heads,
head_dim]`` in the model dtype, allocated per slot by the state pool. Bytes per slot therefore grow
with ``max_model_len`` (from ``max_position_embeddings`` / ``n_positions``), which is the point of the
comparison: a recurrent state does not grow.

Prefill attends over the slot's cached positions ``[0, pos)`` plus the chunk, causally (positions
come from the batch); decode attends over ``[0, pos]``. Decode reads the cache only up to the
longest position in the batch, so its cost grows with context as a paged Transformer server's does.
That length is a host value, so unlike the recurrent families this decode is not CUDA-graph safe
(``decode_graph_safe = False``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.base import DecodeBatch, PrefillBatch, RecurrentLM, States, StateSpec

# Queries per attention call in prefill: bounds the [H, q, kv] score matrix of long prompts.
_QUERY_BLOCK = 1024


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        norm = (
            (lambda: RMSNorm(d, cfg.norm_eps)) if cfg.arch == "llama" else (lambda: nn.LayerNorm(d, eps=cfg.norm_eps))
        )
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.attention_bias)
        if cfg.arch == "llama":
            self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=cfg.mlp_bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.arch == "llama":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        approximate = "tanh" if self.cfg.hidden_act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast") else "none"
        return self.down_proj(F.gelu(self.up_proj(x), approximate=approximate))

    def qkv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> q [N, H, hd], k and v [N, Hkv, hd], RoPE applied to q and k."""
        n, hd = x.shape[0], self.cfg.head_dim
        q = self.q_proj(x).view(n, self.cfg.num_heads, hd)
        k = self.k_proj(x).view(n, self.cfg.num_kv_heads, hd)
        v = self.v_proj(x).view(n, self.cfg.num_kv_heads, hd)
        if rope is not None:
            cos, sin = rope  # [N, 1, hd]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        return q, k, v


class TransformerLM(RecurrentLM):
    """LLaMA-style or GPT-2 decoder with a per-slot KV cache as its state."""

    decode_graph_safe = False
    # "auto": per-sequence attention on the CPU, batched over a gathered window elsewhere;
    # "per_seq" / "batched" force one (tests compare them).
    decode_attention: str = "auto"

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        # limit_context lowers this to --max-model-len before the engine sizes the pool.
        self.max_model_len = cfg.max_position_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = (
            nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.arch == "gpt2" else None
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = (
            RMSNorm(cfg.hidden_size, cfg.norm_eps)
            if cfg.arch == "llama"
            else nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer(
            "inv_freq",
            1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)),
            persistent=False,
        )

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> TransformerLM:
        return cls(TransformerConfig.from_hf(config))

    def post_load(self) -> None:
        # The loader casts the module to the model dtype; RoPE frequencies must stay fp32.
        self.inv_freq = 1.0 / (
            self.cfg.rope_theta
            ** (torch.arange(0, self.cfg.head_dim, 2, dtype=torch.float32, device=self.device) / self.cfg.head_dim)
        )

    def limit_context(self, max_model_len: int) -> None:
        self.max_model_len = min(self.max_model_len, max_model_len)

    def state_specs(self) -> list[list[StateSpec]]:
        shape = (self.max_model_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        dtype = self.dtype
        return [[StateSpec("k", shape, dtype), StateSpec("v", shape, dtype)] for _ in range(self.cfg.num_layers)]

    # ----------------------------------------------------------------- weights

    def _our_name(self, name: str) -> str | None:
        """Checkpoint name -> parameter name (None: not a parameter of ours)."""
        if self.cfg.arch == "llama":
            if name.endswith("rotary_emb.inv_freq"):
                return None
            name = name.removeprefix("model.")
            return name.replace(".self_attn.", ".").replace(".mlp.", ".")
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # causal-mask buffers of old GPT-2 checkpoints
        tops = (("wte.", "embed_tokens."), ("wpe.", "embed_positions."), ("ln_f.", "norm."), ("h.", "layers."))
        for old, new in tops:
            if name.startswith(old):
                name = new + name[len(old) :]
        for old, new in (
            (".ln_1.", ".input_layernorm."),
            (".ln_2.", ".post_attention_layernorm."),
            (".attn.c_proj.", ".o_proj."),
            (".mlp.c_fc.", ".up_proj."),
            (".mlp.c_proj.", ".down_proj."),
        ):
            name = name.replace(old, new)
        return name

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for ckpt_name, tensor in weights:
            if self.cfg.tie_word_embeddings and ckpt_name == "lm_head.weight":
                continue
            name = self._our_name(ckpt_name)
            if name is None:
                continue
            if self.cfg.arch == "gpt2" and ".attn.c_attn." in name:
                # Conv1D stores [in, 3*out]: split into q, k, v and transpose to Linear's [out, in].
                prefix = name.split(".attn.c_attn.")[0]
                kind = name.rsplit(".", 1)[1]
                for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=-1)):
                    target = f"{prefix}.{part}.{kind}"
                    params[target].copy_(t.t() if kind == "weight" else t)
                    filled.add(target)
                continue
            if name not in params:
                raise KeyError(f"unexpected checkpoint tensor {ckpt_name!r}")
            if self.cfg.arch == "gpt2" and name.endswith(("o_proj.weight", "up_proj.weight", "down_proj.weight")):
                tensor = tensor.t()  # Conv1D [in, out] -> Linear [out, in]
            if params[name].shape != tensor.shape:
                raise ValueError(f"{ckpt_name}: checkpoint shape {tuple(tensor.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            filled.add(name)
        return filled

    # ----------------------------------------------------------------- forward

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin [N, 1, hd] for LLaMA; None for GPT-2 (learned positions)."""
        if self.cfg.arch != "llama":
            return None
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            h = h + self.embed_positions(positions)
        return h

    def _check_positions(self, positions: torch.Tensor) -> int:
        end = int(positions.max()) + 1
        if end > self.max_model_len:
            raise ValueError(f"position {end - 1} is beyond the KV cache (max_model_len {self.max_model_len})")
        return end

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, H, Q, hd], k/v [B, Hkv, K, hd], mask [B, 1, Q, K] bool or None -> [B, H, Q, hd]."""
        group = self.cfg.num_heads // self.cfg.num_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.cfg.head_dim))

    @torch.no_grad()
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        self._check_positions(batch.positions)
        bounds = batch.cu_seqlens.tolist()
        slots = batch.slot_ids.tolist()
        positions = batch.positions
        rope = self._rope(positions)
        h = self._embed(batch.input_ids, positions)  # [T, D]
        for layer, st in zip(self.layers, states):
            x = layer.input_layernorm(h)
            q, k, v = layer.qkv(x, rope)  # [T, H, hd], [T, Hkv, hd]
            out = torch.empty_like(q)
            kc, vc = st["k"], st["v"]  # [S, L, Hkv, hd]
            for b, slot in enumerate(slots):
                s, e = bounds[b], bounds[b + 1]
                if s == e:
                    continue
                pos = positions[s:e]
                # A chunk's positions are contiguous: the cache keeps [0, pos) from earlier chunks.
                kc[slot].index_copy_(0, pos, k[s:e])
                vc[slot].index_copy_(0, pos, v[s:e])
                kv_len = int(pos[-1]) + 1
                keys = kc[slot, :kv_len].transpose(0, 1)[None]  # [1, Hkv, K, hd]
                vals = vc[slot, :kv_len].transpose(0, 1)[None]
                key_pos = torch.arange(kv_len, device=pos.device)
                for qs in range(s, e, _QUERY_BLOCK):
                    qe = min(qs + _QUERY_BLOCK, e)
                    mask = (key_pos[None, :] <= positions[qs:qe, None])[None, None]  # [1, 1, Q, K]
                    o = self._attend(q[qs:qe].transpose(0, 1)[None], keys, vals, mask)  # [1, H, Q, hd]
                    out[qs:qe] = o[0].transpose(0, 1)
            h = h + layer.o_proj(out.flatten(1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.norm(h[batch.logits_indices])
        return self.lm_head(h).float()

    @torch.no_grad()
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        # Read each cache only up to its own position: decode cost grows with context, as a paged
        # Transformer server's does.
        kv_len = self._check_positions(batch.positions)
        positions, slots = batch.positions, batch.slot_ids
        rope = self._rope(positions)
        h = self._embed(batch.input_ids, positions)  # [B, D]
        # CPU: one attention per sequence over views of its own cache (no copy, no padding keys).
        # Elsewhere: one batched attention over a gathered [B, K] window, fewer kernel launches.
        per_seq = self.decode_attention == "per_seq" or (self.decode_attention == "auto" and h.device.type == "cpu")
        if per_seq:
            lengths = (positions + 1).tolist()
            slot_list = slots.tolist()
        else:
            key_pos = torch.arange(kv_len, device=positions.device)
            mask = (key_pos[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, K]
        for layer, st in zip(self.layers, states):
            x = layer.input_layernorm(h)
            q, k, v = layer.qkv(x, rope)  # [B, H, hd], [B, Hkv, hd]
            kc, vc = st["k"], st["v"]  # [S, L, Hkv, hd]
            kc[slots, positions] = k
            vc[slots, positions] = v
            if per_seq:
                o = torch.cat(
                    [
                        self._attend(
                            q[b, :, None, :][None],  # [1, H, 1, hd]
                            kc[slot, :n].transpose(0, 1)[None],  # [1, Hkv, n, hd]
                            vc[slot, :n].transpose(0, 1)[None],
                            None,
                        )
                        for b, (slot, n) in enumerate(zip(slot_list, lengths))
                    ]
                )  # [B, H, 1, hd]
            else:
                keys = kc[slots, :kv_len].transpose(1, 2)  # [B, Hkv, K, hd]
                vals = vc[slots, :kv_len].transpose(1, 2)
                o = self._attend(q[:, :, None, :], keys, vals, mask)  # [B, H, 1, hd]
            h = h + layer.o_proj(o.flatten(1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h)).float()
