"""RWKV-7 ("Goose"): BlinkDL ``.pth`` files and the fla-hub HF layout, mapped onto one module.

Per layer and sequence the state is ``att_x [D]`` and ``ffn_x [D]`` (the previous token's LN1 / LN2
output, model dtype) and ``wkv [H, N, N]`` fp32, laid out [H, K, V] (the ``rwkv`` package keeps its
transpose). ``v_first`` (layer 0's value of the same token) is passed down the layers of one token and
is not state. Time mixing of a token, with δ = prev − x:

    x_* = x + δ ⊙ μ_*;  r = W_r x_r;  k = W_k x_k;  v = W_v x_v
    log w = −e^{−1/2} σ(w0 + tanh(x_w W1) W2);  a = σ(a0 + x_a A1 A2);  g = σ(x_g G1) G2
    κ = normalize_head(k ⊙ k_k);  k ← k ⊙ (1 + (a − 1) ⊙ k_a)
    v ← v + (v_first − v) ⊙ σ(v0 + x_v V1 V2)  (layers > 0; layer 0 sets v_first = v)
    S ← (diag(w) − (κ ⊙ a) κᵀ) S + k vᵀ  (S [K, V] per head; the kernel's a_wkv = −κ, b_wkv = κ ⊙ a)
    o = GroupNorm_H(rᵀ S) + (Σ_head r ⊙ k ⊙ r_k) v;  out = W_o (o ⊙ g)

and channel mixing ``W_v relu(W_k (x + δ ⊙ μ_k))²``. Block 0 applies LN0 to the embedding.

Parameter names are BlinkDL's (``emb``, ``blocks.{i}.att.*``), with the low-rank matrices (w1, w2, a1,
a2, v1, v2, g1, g2) stored as ``nn.Linear`` weights [out, in]: fla's ``*_lora.lora.{0,2}`` are that
already, BlinkDL's are transposed on load.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.dispatch import Backend, get_kernel
from rnnserve.models.base import DecodeBatch, LayerStates, PrefillBatch, RecurrentLM, States, StateSpec
from rnnserve.models.layers import quantize_int8
from rnnserve.models.rwkv4 import token_shift_step, token_shift_varlen
from rnnserve.models.weights import WeightsMapper, load_weights, reshape_weight_loader, set_weight_loader

# log w = -e^{-1/2} σ(·): every step keeps at least e^{-0.61} of each state channel.
_DECAY_SCALE = math.exp(-0.5)
# BlinkDL's GroupNorm eps on the WKV output (fla writes it as head_dim * norm_eps = 64 * 1e-5).
_BLINKDL_GROUP_NORM_EPS = 64e-5

_LORA_KINDS = ("w", "a", "v", "g")


@dataclass(frozen=True)
class Rwkv7Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    head_dim: int
    decay_low_rank_dim: int
    a_low_rank_dim: int
    v_low_rank_dim: int
    gate_low_rank_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    group_norm_eps: float = _BLINKDL_GROUP_NORM_EPS
    norm_bias: bool = True
    pre_norm: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.head_dim:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of head_dim {self.head_dim}")
        if self.num_layers < 1 or self.vocab_size < 1:
            raise ValueError(f"invalid RWKV-7 config {self}")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @classmethod
    def from_hf(cls, c: dict) -> Rwkv7Config:
        """From fla's RWKV7Config fields (``group_norm_eps`` is ours, set for BlinkDL files)."""
        d = c["hidden_size"]
        if c.get("attn"):
            raise ValueError("RWKV-7 hybrids with softmax-attention layers (config 'attn') are not supported")
        value_dim = c.get("value_dim")
        if value_dim is not None and any(vd != d for vd in (value_dim if isinstance(value_dim, list) else [value_dim])):
            raise ValueError(f"RWKV-7 with value_dim {value_dim} != hidden_size {d} is not supported")
        if c.get("head_dim"):
            head_dim = c["head_dim"]
        elif c.get("num_heads"):
            head_dim = d // c["num_heads"]
        else:
            head_dim = 64
        inter = c.get("intermediate_size")
        if not inter:
            inter = int(d * (c.get("hidden_ratio") or 4))
            inter = 32 * ((inter + 31) // 32)
        norm_eps = c.get("norm_eps", 1e-5)
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=d,
            num_layers=c["num_hidden_layers"],
            head_dim=head_dim,
            decay_low_rank_dim=c["decay_low_rank_dim"],
            a_low_rank_dim=c["a_low_rank_dim"],
            v_low_rank_dim=c["v_low_rank_dim"],
            gate_low_rank_dim=c["gate_low_rank_dim"],
            intermediate_size=inter,
            norm_eps=norm_eps,
            group_norm_eps=c.get("group_norm_eps") or head_dim * norm_eps,
            norm_bias=c.get("norm_bias", True),
            pre_norm=c.get("norm_first", True),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


class _LowRank(nn.Module):
    """x -> x W1ᵀ -> act -> W2ᵀ (+ bias): BlinkDL's (x @ w1) @ w2 and fla's LoRA."""

    def __init__(self, dim: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=bias)


class Rwkv7Attention(nn.Module):
    def __init__(self, cfg: Rwkv7Config, index: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.first = index == 0
        self.gn_eps = cfg.group_norm_eps
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a"):
            self.register_parameter(name, nn.Parameter(torch.empty(d)))
        self.r_k = nn.Parameter(torch.empty(cfg.num_heads, cfg.head_dim))
        self.w_lora = _LowRank(d, cfg.decay_low_rank_dim, bias=True)
        self.a_lora = _LowRank(d, cfg.a_low_rank_dim, bias=True)
        self.v_lora = None if self.first else _LowRank(d, cfg.v_low_rank_dim, bias=True)
        self.g_lora = _LowRank(d, cfg.gate_low_rank_dim, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        self.ln_x = nn.GroupNorm(cfg.num_heads, d, eps=cfg.group_norm_eps)

    def forward(
        self, x: torch.Tensor, prev: torch.Tensor, v_first: torch.Tensor | None, wkv: Callable[..., torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] (LN1 output), prev [N, D] (previous token's), v_first [N, D] (None in layer 0);
        ``wkv(r, log_w, k, v, a, b)`` on [N, H, P] runs the recurrence. Returns (out [N, D], v_first)."""
        n, d = x.shape
        h, p = self.heads, self.head_dim
        delta = prev - x
        xr, xw, xk = x + delta * self.x_r, x + delta * self.x_w, x + delta * self.x_k
        xv, xa, xg = x + delta * self.x_v, x + delta * self.x_a, x + delta * self.x_g

        r = self.receptance(xr)
        w_pre = self.w_lora.up(torch.tanh(self.w_lora.down(xw)))
        log_w = -_DECAY_SCALE * torch.sigmoid(w_pre.float())  # [N, D] fp32
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a_lora.up(self.a_lora.down(xa)))
        g = self.g_lora.up(torch.sigmoid(self.g_lora.down(xg)))

        kk = F.normalize((k * self.k_k).view(n, h, p), dim=-1, p=2.0).view(n, d)
        k = k * (1 + (a - 1) * self.k_a)
        if self.v_lora is None:
            v_first = v
        else:
            assert v_first is not None
            v = v + (v_first - v) * torch.sigmoid(self.v_lora.up(self.v_lora.down(xv)))

        o = wkv(
            r.view(n, h, p),
            log_w.view(n, h, p),
            k.view(n, h, p),
            v.view(n, h, p),
            (-kk).view(n, h, p),
            (kk * a).view(n, h, p),
        )  # [N, H, P] fp32
        o = F.group_norm(o.reshape(n, d).to(x.dtype), h, self.ln_x.weight, self.ln_x.bias, eps=self.gn_eps)
        bonus = (r * k * self.r_k.view(d)).view(n, h, p).sum(-1, keepdim=True) * v.view(n, h, p)  # [N, H, P]
        o = o + bonus.view(n, d)
        return self.output(o * g), v_first


class Rwkv7FeedForward(nn.Module):
    def __init__(self, cfg: Rwkv7Config) -> None:
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(cfg.hidden_size))
        self.key = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.value = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.value(torch.relu(self.key(x + (prev - x) * self.x_k)) ** 2)


class Rwkv7Block(nn.Module):
    """One block; ``prefill`` / ``decode`` run it on a packed batch / one token per sequence, reading
    and writing the layer's states in place, and pass ``v_first`` on. ``decode`` is the unit the CPU
    compiled path compiles."""

    def __init__(self, cfg: Rwkv7Config, index: int, backend: Backend) -> None:
        super().__init__()

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)

        self.ln0 = norm() if index == 0 and cfg.pre_norm else None
        self.ln1 = norm()
        self.ln2 = norm()
        self.att = Rwkv7Attention(cfg, index)
        self.ffn = Rwkv7FeedForward(cfg)
        self._wkv_varlen = get_kernel("wkv7.chunk", backend)
        self._wkv_step = get_kernel("wkv7.recurrent", backend)

    def _run(
        self,
        x: torch.Tensor,
        v_first: torch.Tensor | None,
        st: LayerStates,
        shift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        wkv: Callable[..., torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ln0 is not None:
            x = self.ln0(x)
        xx = self.ln1(x)
        att, v_first = self.att(xx, shift(xx, st["att_x"]), v_first, wkv)
        x = x + att
        xx = self.ln2(x)
        return x + self.ffn(xx, shift(xx, st["ffn_x"])), v_first

    def prefill(
        self,
        x: torch.Tensor,
        v_first: torch.Tensor | None,
        st: LayerStates,
        seqs: Varlen,
        slot_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] packed; v_first [T, D] (None in layer 0). Returns (x, v_first)."""
        return self._run(
            x,
            v_first,
            st,
            lambda xx, s: token_shift_varlen(xx, s, seqs.cu_seqlens, slot_ids),
            lambda r, w, k, v, a, b: self._wkv_varlen(r, w, k, v, a, b, st["wkv"], seqs, slot_ids),
        )

    def decode(
        self, x: torch.Tensor, v_first: torch.Tensor | None, st: LayerStates, slot_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D], one token per sequence; v_first [B, D] (None in layer 0). Returns (x, v_first)."""
        return self._run(
            x,
            v_first,
            st,
            lambda xx, s: token_shift_step(xx, s, slot_ids),
            lambda r, w, k, v, a, b: self._wkv_step(r, w, k, v, a, b, st["wkv"], slot_ids),
        )


# fla-hub name fragment -> ours, applied in order after "model.layers." -> "blocks."
_FLA_RENAMES = (
    (".attn_norm.", ".ln1."),
    (".ffn_norm.", ".ln2."),
    (".pre_norm.", ".ln0."),
    (".attn.", ".att."),
    (".r_proj.", ".receptance."),
    (".k_proj.", ".key."),
    (".v_proj.", ".value."),
    (".o_proj.", ".output."),
    (".g_norm.", ".ln_x."),
    (".lora.0.", ".down."),
    (".lora.2.", ".up."),
)
# BlinkDL low-rank names: att.{w,a,v,g}{1,2} are [in, out] matrices, {w,a,v}0 the up-projection bias.
_BLINKDL_LORA = re.compile(r"(blocks\.\d+\.att)\.([wavg])([012])$")


def _unstack_and_transpose(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors that need more than a rename, as tensors of our parameters: fla's first
    layout stacks the six lerp weights in one ``attn.x_x [6, ..., D]``; BlinkDL's low-rank
    ``att.{w,a,v,g}{1,2}`` are [in, out] matrices (transposed here to nn.Linear's [out, in]) and
    ``att.{w,a,v}0`` the up-projection's bias. BlinkDL stores layer 0's value-residual weights too,
    which nothing reads: dropped."""
    for name, tensor in weights:
        if name.endswith("attn.x_x"):
            prefix, parts = name.removesuffix("x_x"), tensor.reshape(6, -1)
            yield from ((f"{prefix}x_{c}", parts[i]) for i, c in enumerate("rwkvag"))
            continue
        m = _BLINKDL_LORA.match(name)
        if m is None:
            yield name, tensor
            continue
        prefix, kind, part = m.groups()
        if kind == "v" and prefix == "blocks.0.att":
            continue
        if part == "0":
            yield f"{prefix}.{kind}_lora.up.bias", tensor
        else:
            yield f"{prefix}.{kind}_lora.{'down' if part == '1' else 'up'}.weight", tensor.t()


class Rwkv7LM(RecurrentLM):
    """RWKV-7 over packed batches; states ``att_x, wkv, ffn_x`` per layer."""

    def __init__(self, cfg: Rwkv7Config, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Rwkv7Block(cfg, i, backend) for i in range(cfg.num_layers))
        self.ln_out = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.emb.weight

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> Rwkv7LM:
        return cls(Rwkv7Config.from_hf(config), backend)

    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> dict | None:
        """An fla-style config for a BlinkDL RWKV-7 ``.pth`` (recognised by ``att.r_k``), else None."""
        if "emb.weight" not in sd or "blocks.0.att.r_k" not in sd:
            return None
        layers = 1 + max(int(m.group(1)) for name in sd if (m := re.match(r"blocks\.(\d+)\.", name)))
        vocab, hidden = sd["emb.weight"].shape
        heads, head_dim = sd["blocks.0.att.r_k"].shape
        # Layer 0's v1 is unused but present in BlinkDL files; any layer's gives the rank.
        v1 = sd.get("blocks.1.att.v1", sd.get("blocks.0.att.v1"))
        return {
            "architectures": ["RWKV7ForCausalLM"],
            "model_type": "rwkv7",
            "vocab_size": int(vocab),
            "hidden_size": int(hidden),
            "head_dim": int(head_dim),
            "num_heads": int(heads),
            "num_hidden_layers": layers,
            "decay_low_rank_dim": int(sd["blocks.0.att.w1"].shape[1]),
            "a_low_rank_dim": int(sd["blocks.0.att.a1"].shape[1]),
            "v_low_rank_dim": int(v1.shape[1]) if v1 is not None else 1,
            "gate_low_rank_dim": int(sd["blocks.0.att.g1"].shape[1]),
            "intermediate_size": int(sd["blocks.0.ffn.key.weight"].shape[0]),
            "norm_eps": 1e-5,
            "group_norm_eps": _BLINKDL_GROUP_NORM_EPS,
            "norm_bias": True,
            "norm_first": True,
            "tie_word_embeddings": "head.weight" not in sd,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }

    def state_specs(self) -> list[list[StateSpec]]:
        d, h, p = self.cfg.hidden_size, self.cfg.num_heads, self.cfg.head_dim
        dtype = self.dtype
        return [
            [
                StateSpec("att_x", (d,), dtype),
                StateSpec("wkv", (h, p, p), torch.float32),
                StateSpec("ffn_x", (d,), dtype),
            ]
            for _ in range(self.cfg.num_layers)
        ]

    # ----------------------------------------------------------------- weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for name, param in self.named_parameters():
            if param.dim() == 1 or name.endswith(".r_k"):  # [1, 1, D] lerp weights and biases, [H, N] vs flat r_k
                set_weight_loader(param, reshape_weight_loader)
        mapper = WeightsMapper(
            # fla-hub layout -> BlinkDL's names, which are ours
            prefixes=(
                ("model.embeddings.", "emb."),
                ("model.norm.", "ln_out."),
                ("model.layers.", "blocks."),
                ("lm_head.", "head."),
            ),
            substrings=_FLA_RENAMES,
            ignore_suffixes=("head.weight",) if self.cfg.tie_word_embeddings else (),
        )
        return load_weights(self, _unstack_and_transpose(weights), mapper)

    def quantize_int8(self) -> None:
        """int8 receptance / key / value / output, the channel mix's key / value and the head (~98% of the
        weight bytes). The low-rank w / a / v / g pairs (rank 32-128, ~2%) stay fp32: they make the decay,
        in-context learning rate and gate, where int8 noise would compound through the state; so do the
        embedding, norms and per-channel vectors, activations and the state."""
        for block in self.blocks:
            for name in ("receptance", "key", "value", "output"):
                setattr(block.att, name, quantize_int8(getattr(block.att, name)))
            block.ffn.key = quantize_int8(block.ffn.key)
            block.ffn.value = quantize_int8(block.ffn.value)
        self.head = quantize_int8(self.head)  # a tied embedding keeps its fp32 weight for lookups

    # ----------------------------------------------------------------- forward

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_out(x)).float()

    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        x, v_first = self.emb(batch.input_ids), None
        for block, st in zip(self.blocks, states):
            x, v_first = block.prefill(x, v_first, st, batch.varlen, batch.slot_ids)
        return self._logits(x.index_select(0, batch.logits_indices))

    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        x, v_first = self.emb(batch.input_ids), None
        for block, st in zip(self.blocks, states):
            x, v_first = block.decode(x, v_first, st, batch.slot_ids)
        return self._logits(x)
