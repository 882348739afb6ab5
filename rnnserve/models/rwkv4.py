"""RWKV-4: transformers ``RwkvForCausalLM`` folders and BlinkDL ``.pth`` files, one module.

Per layer and sequence the state is ``att_x [D]`` and ``ffn_x [D]`` (the previous token's LN1 / LN2
output, model dtype) and the WKV numerator / denominator / running max ``aa, bb, pp [A]`` (fp32,
``pp`` starts at -1e30). Block i:

    xx = LN1(x); k, v, r from lerps of xx with the previous token's xx; r = σ(W_r ·)
    x += W_o(r ⊙ WKV(w = -exp(time_decay), u = time_first, k, v))
    xx = LN2(x); x += σ(W_r rx) ⊙ W_v relu(W_k kx)²

with LN0 applied to the embedding in block 0. Parameter names are BlinkDL's (``emb``, ``blocks.{i}.att.*``);
transformers names are mapped onto them on load. transformers' ``rescale_every`` (halving the hidden
state every N blocks in eval) is an fp16 overflow guard that is exact up to LayerNorm eps; it is not
applied here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.dispatch import Backend, get_kernel
from rnnserve.models.base import DecodeBatch, LayerStates, PrefillBatch, RecurrentLM, States, StateSpec
from rnnserve.models.layers import quantize_int8
from rnnserve.models.weights import (
    WeightLoader,
    WeightsMapper,
    load_weights,
    reshape_weight_loader,
    set_weight_loader,
)

# Initial running max of the WKV state: exp(pp - anything) is 0, so a fresh state contributes nothing.
PP_FILL = -1e30


def token_shift_varlen(
    x: torch.Tensor, shift_state: torch.Tensor, cu_seqlens: torch.Tensor, slot_ids: torch.Tensor
) -> torch.Tensor:
    """The previous token's x for every token of a packed batch: x [T, D]; shift_state [S, D] holds each
    slot's last x (read for the first token of each sequence, then overwritten with its last token's x,
    in place). Returns [T, D]."""
    cu = cu_seqlens.long()
    prev = torch.cat([x[:1], x[:-1]])
    prev.index_copy_(0, cu[:-1], shift_state.index_select(0, slot_ids).to(x.dtype))
    shift_state.index_copy_(0, slot_ids, x.index_select(0, cu[1:] - 1).to(shift_state.dtype))
    return prev


def token_shift_step(x: torch.Tensor, shift_state: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """Decode: x [B, D]; returns each slot's previous x [B, D] and stores x in its place."""
    prev = shift_state.index_select(0, slot_ids).to(x.dtype)
    shift_state.index_copy_(0, slot_ids, x.to(shift_state.dtype))
    return prev


def _mix(x: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    # The references' exact form (not prev + (x - prev)·mix), so fp32 results round the same way.
    return x * mix + prev * (1 - mix)


@dataclass(frozen=True)
class Rwkv4Config:
    vocab_size: int
    hidden_size: int
    attention_hidden_size: int
    intermediate_size: int
    num_layers: int
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.hidden_size < 1 or self.vocab_size < 1:
            raise ValueError(f"invalid RWKV-4 config {self}")

    @classmethod
    def from_hf(cls, c: dict) -> Rwkv4Config:
        d = c["hidden_size"]
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=d,
            attention_hidden_size=c.get("attention_hidden_size") or d,
            intermediate_size=c.get("intermediate_size") or 4 * d,
            num_layers=c["num_hidden_layers"],
            layer_norm_eps=c.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


class Rwkv4Attention(nn.Module):
    def __init__(self, cfg: Rwkv4Config) -> None:
        super().__init__()
        d, a = cfg.hidden_size, cfg.attention_hidden_size
        self.time_decay = nn.Parameter(torch.empty(a))
        self.time_first = nn.Parameter(torch.empty(a))
        self.time_mix_k = nn.Parameter(torch.empty(d))
        self.time_mix_v = nn.Parameter(torch.empty(d))
        self.time_mix_r = nn.Parameter(torch.empty(d))
        self.key = nn.Linear(d, a, bias=False)
        self.value = nn.Linear(d, a, bias=False)
        self.receptance = nn.Linear(d, a, bias=False)
        self.output = nn.Linear(a, d, bias=False)
        # fp32 copies the WKV kernels read, filled from the checkpoint's own precision on load:
        # w = -exp(time_decay) [A], u = time_first [A].
        self.register_buffer("w", torch.zeros(a, dtype=torch.float32), persistent=False)
        self.register_buffer("u", torch.zeros(a, dtype=torch.float32), persistent=False)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor, wkv: Callable[..., torch.Tensor]) -> torch.Tensor:
        """xx [N, D] (LN1 output), prev [N, D] (previous token's); ``wkv(w, u, k, v)`` runs the recurrence."""
        r = torch.sigmoid(self.receptance(_mix(xx, prev, self.time_mix_r)))
        k = self.key(_mix(xx, prev, self.time_mix_k)).float()
        v = self.value(_mix(xx, prev, self.time_mix_v)).float()
        return self.output(r * wkv(self.w, self.u, k, v).to(r.dtype))


class Rwkv4FeedForward(nn.Module):
    def __init__(self, cfg: Rwkv4Config) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.time_mix_k = nn.Parameter(torch.empty(d))
        self.time_mix_r = nn.Parameter(torch.empty(d))
        self.key = nn.Linear(d, f, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(f, d, bias=False)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        r = torch.sigmoid(self.receptance(_mix(xx, prev, self.time_mix_r)))
        return r * self.value(torch.relu(self.key(_mix(xx, prev, self.time_mix_k))) ** 2)


class Rwkv4Block(nn.Module):
    """One block; ``prefill`` / ``decode`` run it on a packed batch / one token per sequence, reading
    and writing the layer's states in place. ``decode`` is the unit the CPU compiled path compiles."""

    def __init__(self, cfg: Rwkv4Config, index: int, backend: Backend) -> None:
        super().__init__()
        eps = cfg.layer_norm_eps
        self.ln0 = nn.LayerNorm(cfg.hidden_size, eps=eps) if index == 0 else None
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.att = Rwkv4Attention(cfg)
        self.ffn = Rwkv4FeedForward(cfg)
        self._wkv_varlen = get_kernel("wkv4.chunk", backend)
        self._wkv_step = get_kernel("wkv4.recurrent", backend)

    def _run(
        self,
        x: torch.Tensor,
        st: LayerStates,
        shift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        wkv: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        if self.ln0 is not None:
            x = self.ln0(x)
        xx = self.ln1(x)
        x = x + self.att(xx, shift(xx, st["att_x"]), wkv)
        xx = self.ln2(x)
        return x + self.ffn(xx, shift(xx, st["ffn_x"]))

    def prefill(self, x: torch.Tensor, st: LayerStates, seqs: Varlen, slot_ids: torch.Tensor) -> torch.Tensor:
        """x [T, D] packed; seqs: the step's sequence boundaries."""
        return self._run(
            x,
            st,
            lambda xx, s: token_shift_varlen(xx, s, seqs.cu_seqlens, slot_ids),
            lambda w, u, k, v: self._wkv_varlen(w, u, k, v, st["aa"], st["bb"], st["pp"], seqs, slot_ids),
        )

    def decode(self, x: torch.Tensor, st: LayerStates, slot_ids: torch.Tensor) -> torch.Tensor:
        """x [B, D], one token per sequence."""
        return self._run(
            x,
            st,
            lambda xx, s: token_shift_step(xx, s, slot_ids),
            lambda w, u, k, v: self._wkv_step(w, u, k, v, st["aa"], st["bb"], st["pp"], slot_ids),
        )


# transformers name fragment -> BlinkDL (our) name fragment
_HF_RENAMES = (
    (".attention.", ".att."),
    (".feed_forward.", ".ffn."),
    (".pre_ln.", ".ln0."),
    ("time_mix_key", "time_mix_k"),
    ("time_mix_value", "time_mix_v"),
    ("time_mix_receptance", "time_mix_r"),
)


def _keep_fp32(att: Rwkv4Attention, buffer: str, derive: Callable[[torch.Tensor], torch.Tensor]) -> WeightLoader:
    """A load hook that also sets ``att.<buffer>`` to ``derive`` of the checkpoint tensor in fp32:
    the loader casts the module (buffers included) to the model dtype before loading, and the WKV
    kernels read w = -exp(time_decay) and u = time_first exact."""

    def load(param: nn.Parameter, tensor: torch.Tensor) -> None:
        reshape_weight_loader(param, tensor)
        setattr(att, buffer, derive(tensor.reshape(param.shape).to(param.device, torch.float32)).clone())

    return load


class Rwkv4LM(RecurrentLM):
    """RWKV-4 over packed batches; states ``att_x, aa, bb, pp, ffn_x`` per layer."""

    def __init__(self, cfg: Rwkv4Config, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Rwkv4Block(cfg, i, backend) for i in range(cfg.num_layers))
        self.ln_out = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.emb.weight

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> Rwkv4LM:
        return cls(Rwkv4Config.from_hf(config), backend)

    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> dict | None:
        """An HF-style config for a BlinkDL RWKV-4 ``.pth`` (None if the names are not RWKV-4's:
        v5/v6 add ``ln_x`` / ``time_maa``, v7 has ``att.r_k`` and no ``time_mix``)."""
        if "emb.weight" not in sd or "blocks.0.att.time_mix_k" not in sd or "blocks.0.att.time_first" not in sd:
            return None
        if any(".ln_x." in name or "time_maa" in name or "time_faaaa" in name for name in sd):
            return None
        layers = 1 + max(int(m.group(1)) for name in sd if (m := re.match(r"blocks\.(\d+)\.", name)))
        vocab, hidden = sd["emb.weight"].shape
        return {
            "architectures": ["RwkvForCausalLM"],
            "model_type": "rwkv",
            "vocab_size": int(vocab),
            "hidden_size": int(hidden),
            "attention_hidden_size": int(sd["blocks.0.att.key.weight"].shape[0]),
            "intermediate_size": int(sd["blocks.0.ffn.key.weight"].shape[0]),
            "num_hidden_layers": layers,
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": "head.weight" not in sd,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }

    def state_specs(self) -> list[list[StateSpec]]:
        d, a = self.cfg.hidden_size, self.cfg.attention_hidden_size
        dtype = self.dtype
        return [
            [
                StateSpec("att_x", (d,), dtype),
                StateSpec("aa", (a,), torch.float32),
                StateSpec("bb", (a,), torch.float32),
                StateSpec("pp", (a,), torch.float32, fill=PP_FILL),
                StateSpec("ffn_x", (d,), dtype),
            ]
            for _ in range(self.cfg.num_layers)
        ]

    # ----------------------------------------------------------------- weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for block in self.blocks:
            att, ffn = block.att, block.ffn
            for lerp in (att.time_mix_k, att.time_mix_v, att.time_mix_r, ffn.time_mix_k, ffn.time_mix_r):
                set_weight_loader(lerp, reshape_weight_loader)  # stored [1, 1, D]
            set_weight_loader(att.time_decay, _keep_fp32(att, "w", lambda exact: -torch.exp(exact)))
            set_weight_loader(att.time_first, _keep_fp32(att, "u", lambda exact: exact))
        mapper = WeightsMapper(
            # transformers layout (``rwkv.*``, ``head``) -> BlinkDL's names, which are ours
            prefixes=(("rwkv.embeddings.", "emb."), ("rwkv.", "")),
            substrings=_HF_RENAMES,
            ignore_suffixes=("head.weight",) if self.cfg.tie_word_embeddings else (),
        )
        return load_weights(self, weights, mapper)

    def quantize_int8(self) -> None:
        """int8 key / value / receptance / output of the time mix, key / receptance / value of the channel
        mix, and the head: every matrix. The embedding lookup, LayerNorms, time-mix vectors and the decay
        / bonus (w, u) stay fp32, as do activations and the state."""
        for block in self.blocks:
            for part, names in (
                (block.att, ("key", "value", "receptance", "output")),
                (block.ffn, ("key", "receptance", "value")),
            ):
                for name in names:
                    setattr(part, name, quantize_int8(getattr(part, name)))
        self.head = quantize_int8(self.head)  # a tied embedding keeps its fp32 weight for lookups

    # ----------------------------------------------------------------- forward

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_out(x)).float()

    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        x = self.emb(batch.input_ids)
        for block, st in zip(self.blocks, states):
            x = block.prefill(x, st, batch.varlen, batch.slot_ids)
        return self._logits(x.index_select(0, batch.logits_indices))

    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        x = self.emb(batch.input_ids)
        for block, st in zip(self.blocks, states):
            x = block.decode(x, st, batch.slot_ids)
        return self._logits(x)


__all__ = ["Rwkv4Config", "Rwkv4LM", "token_shift_step", "token_shift_varlen"]
