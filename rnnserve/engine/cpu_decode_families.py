"""``--cpu-decode fused`` for RWKV-4, RWKV-7, RetNet, DenseRetNet and DenseMamba: the whole decode step in
one C++ call (``rnnserve/kernels/cpu_decode/rwkv_retnet.cpp``): every projection on weights packed once
into the 16-column panels the Mamba step uses (float32, or int8 with per-channel scales for the layers
that are ``Int8Linear``), everything between them fused in per-(sequence, head) loops, activations and
states in float32, states updated in place by slot. The torch ``model.decode`` stays the reference it
is tested against (tests/engine/test_cpu_decode_families.py).

``engine.cpu_decode.fused_decoder`` dispatches here for these families; ``unsupported_reason`` says why
a model cannot use the path (the runner then decodes with the torch path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnserve.models.base import DecodeBatch, RecurrentLM, States
from rnnserve.models.dense_mamba import DenseMambaLM
from rnnserve.models.dense_retnet import DenseRetNetLM
from rnnserve.models.layers import Int8Linear
from rnnserve.models.retnet import RetNetLM
from rnnserve.models.rwkv4 import Rwkv4LM
from rnnserve.models.rwkv7 import Rwkv7LM

# DenseMambaLM subclasses MambaLM: engine.cpu_decode asks this module first, so the Mamba-1 kernels
# (which would drop the dense fusion) never see it.
FAMILIES = (Rwkv4LM, Rwkv7LM, RetNetLM, DenseRetNetLM, DenseMambaLM)


def pack_linear(linear: nn.Module, ops: Any) -> torch.Tensor:
    """A linear layer's weight [out, in] packed once into panels [ceil(out/16), in, 16] (``pack_weight``,
    which reads a row-major or column-major weight alike); an ``Int8Linear``'s int8 values and scales
    into int8 panels [ceil(out/16), in + 4, 16] (``pack_weight_int8``). A copy: the torch prefill keeps
    reading the model's own weights."""
    if isinstance(linear, Int8Linear):
        return ops.pack_weight_int8(linear.qweight, linear.scale)
    w = linear.weight.detach()
    return ops.pack_weight(w.t(), True) if w.t().is_contiguous() else ops.pack_weight(w.contiguous(), False)


def linear_bias(linear: nn.Module) -> torch.Tensor:
    return torch.empty(0) if linear.bias is None else linear.bias.detach().float().contiguous()


def _norm_rows(norm: nn.LayerNorm) -> list[torch.Tensor]:
    """A LayerNorm's weight and bias (zeros where it has none)."""
    w = norm.weight.detach()
    return [w, torch.zeros_like(w) if norm.bias is None else norm.bias.detach()]


def unsupported_reason(model: RecurrentLM, states: States) -> str | None:
    """Why the fused path cannot serve a model of ``FAMILIES`` (None when it can)."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"the fused CPU decode runs float32 on the CPU (model: {model.dtype} on {model.device.type})"
    if isinstance(model, Rwkv7LM) and model.cfg.head_dim % 8:
        return f"the fused RWKV-7 decode needs a head size that is a multiple of 8 (not {model.cfg.head_dim})"
    for layer in states:
        for t in layer.values():
            if t.dtype != torch.float32 or not t[0].is_contiguous():
                return "the fused CPU decode needs float32 state pools contiguous per slot"
    return None


def make_decoder(model: RecurrentLM, states: States, ops: Any):
    """The fused decoder of a model of ``FAMILIES`` (callable ``DecodeBatch -> logits [B, V]``)."""
    if isinstance(model, Rwkv4LM):
        return FusedRwkv4Decoder(model, states, ops)
    if isinstance(model, Rwkv7LM):
        return FusedRwkv7Decoder(model, states, ops)
    if isinstance(model, DenseRetNetLM):
        return FusedDenseRetNetDecoder(model, states, ops)
    if isinstance(model, DenseMambaLM):
        return FusedDenseMambaDecoder(model, states, ops)
    return FusedRetNetDecoder(model, states, ops)


class FusedRwkv4Decoder:
    """RWKV-4: per-layer vectors stacked once into [n, D] tensors; the matrices packed (``_packed``)."""

    def __init__(self, model: Rwkv4LM, states: States, ops: Any) -> None:
        self.model, self.states, self.ops = model, states, ops
        blocks = list(model.blocks)
        first = blocks[0].ln0
        assert first is not None
        with torch.no_grad():
            self.ln0 = torch.stack(_norm_rows(first)).contiguous()  # [2, D]
            self.ln = [torch.stack(_norm_rows(b.ln1) + _norm_rows(b.ln2)).contiguous() for b in blocks]  # [4, D]
            self.mix = [
                torch.stack(
                    [b.att.time_mix_k, b.att.time_mix_v, b.att.time_mix_r, b.ffn.time_mix_k, b.ffn.time_mix_r]
                ).contiguous()
                for b in blocks
            ]  # [5, D]
            self.wu = [torch.stack([b.att.w, b.att.u]).contiguous() for b in blocks]  # [2, A] fp32
            self.ln_out = torch.stack(_norm_rows(model.ln_out)).contiguous()
        self.mats = tuple(
            [pack_linear(getattr(getattr(b, part), name), ops) for b in blocks]
            for part, name in (
                ("att", "key"),
                ("att", "value"),
                ("att", "receptance"),
                ("att", "output"),
                ("ffn", "key"),
                ("ffn", "receptance"),
                ("ffn", "value"),
            )
        )
        self.emb = model.emb.weight.detach()
        self.head = pack_linear(model.head, ops)
        self.eps = model.cfg.layer_norm_eps

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        st = self.states
        return self.ops.rwkv4_decode(
            batch.input_ids, batch.slot_ids, self.emb, self.ln0, self.ln, self.mix, self.wu, *self.mats,
            *([s[n] for s in st] for n in ("att_x", "aa", "bb", "pp", "ffn_x")), self.ln_out, self.head, self.eps,
        )  # fmt: skip


class FusedRwkv7Decoder:
    """RWKV-7: per-layer vectors stacked once into a few [n, D] tensors (a copy of ~0.1% of the weights);
    the matrices packed (``_packed``)."""

    def __init__(self, model: Rwkv7LM, states: States, ops: Any) -> None:
        self.model, self.states, self.ops = model, states, ops
        cfg = model.cfg
        d = cfg.hidden_size
        blocks = list(model.blocks)
        empty = torch.empty(0)

        def vec(t: torch.Tensor) -> torch.Tensor:
            return t.detach().reshape(d)

        with torch.no_grad():
            first = blocks[0].ln0
            self.ln0 = torch.stack(_norm_rows(first)).contiguous() if first is not None else empty  # [2, D]
            self.ln = [torch.stack(_norm_rows(b.ln1) + _norm_rows(b.ln2)).contiguous() for b in blocks]  # [4, D]
            self.mix = [
                torch.stack(
                    [vec(getattr(b.att, n)) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a", "r_k")]
                    + [vec(b.ffn.x_k)]
                ).contiguous()
                for b in blocks
            ]  # [10, D]
            self.lora_b = [
                torch.stack(
                    [
                        vec(b.att.w_lora.up.bias),
                        vec(b.att.a_lora.up.bias),
                        vec(b.att.v_lora.up.bias) if b.att.v_lora is not None else torch.zeros(d),
                    ]
                ).contiguous()
                for b in blocks
            ]  # [3, D]
            self.ln_x = [torch.stack(_norm_rows(b.att.ln_x)).contiguous() for b in blocks]  # [2, D]
            self.ln_out = torch.stack(_norm_rows(model.ln_out)).contiguous()
        att = [b.att for b in blocks]
        self.mats = (
            [pack_linear(a.receptance, ops) for a in att],
            [pack_linear(a.key, ops) for a in att],
            [pack_linear(a.value, ops) for a in att],
            [pack_linear(a.output, ops) for a in att],
            [pack_linear(a.w_lora.down, ops) for a in att],
            [pack_linear(a.w_lora.up, ops) for a in att],
            [pack_linear(a.a_lora.down, ops) for a in att],
            [pack_linear(a.a_lora.up, ops) for a in att],
            [empty if a.v_lora is None else pack_linear(a.v_lora.down, ops) for a in att],
            [empty if a.v_lora is None else pack_linear(a.v_lora.up, ops) for a in att],
            [pack_linear(a.g_lora.down, ops) for a in att],
            [pack_linear(a.g_lora.up, ops) for a in att],
            [pack_linear(b.ffn.key, ops) for b in blocks],
            [pack_linear(b.ffn.value, ops) for b in blocks],
        )
        self.emb = model.emb.weight.detach()
        self.head = pack_linear(model.head, ops)
        self.dims = (cfg.num_heads, cfg.norm_eps, blocks[0].att.gn_eps)

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        # The state tensors are looked up per step, so a pool that swaps one is followed.
        st = self.states
        return self.ops.rwkv7_decode(
            batch.input_ids, batch.slot_ids, self.emb, self.ln0, self.ln, self.mix, self.lora_b, self.ln_x,
            *self.mats, [s["att_x"] for s in st], [s["wkv"] for s in st], [s["ffn_x"] for s in st],
            self.ln_out, self.head, *self.dims,
        )  # fmt: skip


class FusedRetNetDecoder:
    """RetNet (fla and torchscale retention, GQA, with or without output gate and MLP)."""

    def __init__(self, model: RetNetLM, states: States, ops: Any) -> None:
        self.model, self.states, self.ops = model, states, ops
        cfg = model.cfg
        layers = list(model.model.layers)
        attn = [layer.attn for layer in layers]
        empty = torch.empty(0)
        gnorm = attn[0].g_norm_swish_gate
        self.mats = (
            [layer.attn_norm.weight.detach() for layer in layers],
            [pack_linear(a.q_proj, ops) for a in attn],
            [pack_linear(a.k_proj, ops) for a in attn],
            [pack_linear(a.v_proj, ops) for a in attn],
            [pack_linear(a.g_proj, ops) if cfg.use_output_gate else empty for a in attn],
            [pack_linear(a.o_proj, ops) for a in attn],
            [a.g_norm_swish_gate.weight.detach() if gnorm.weight is not None else empty for a in attn],
            [layer.mlp_norm.weight.detach() for layer in layers] if layers[0].has_mlp else [],
            [pack_linear(layer.mlp.gate_proj, ops) for layer in layers] if layers[0].has_mlp else [],
            [pack_linear(layer.mlp.up_proj, ops) for layer in layers] if layers[0].has_mlp else [],
            [pack_linear(layer.mlp.down_proj, ops) for layer in layers] if layers[0].has_mlp else [],
        )
        retention = attn[0].retention
        rcfg = retention.cfg
        self.consts = (retention.inv_freq, retention.log_gamma)
        self.emb = model.model.embeddings.weight.detach()
        self.norm_f = model.model.norm.weight.detach()
        self.head = pack_linear(model.lm_head, ops)
        self.dims = (
            rcfg.num_heads,
            cfg.num_kv_heads,
            rcfg.head_k_dim,
            rcfg.head_v_dim,
            0 if rcfg.style == "fla" else 1,
            ("none", "sqrt_cn", "abs_sum").index(rcfg.norm),
            cfg.feature_map == "swish",
            cfg.value_act == "swish",
            float(retention.scale),
            float(cfg.norm_eps),
        )

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        return self.ops.retnet_decode(
            batch.input_ids, batch.positions, batch.slot_ids, self.emb, *self.mats,
            [s["S"] for s in self.states], *self.consts, self.norm_f, self.head, *self.dims,
        )  # fmt: skip


class FusedDenseRetNetDecoder:
    """DenseRetNet: the GAU retention layers with the dense k/v fusion over the last m layers."""

    def __init__(self, model: DenseRetNetLM, states: States, ops: Any) -> None:
        self.model, self.states, self.ops = model, states, ops
        cfg = model.cfg
        layers = list(model.model.layers)
        attn = [layer.self_attn for layer in layers]
        empty = torch.empty(0)

        def dense(layer: nn.Module, get) -> torch.Tensor:
            return get(layer.self_attn).detach() if layer.fuse else empty

        def select(layer: nn.Module, get) -> torch.Tensor:
            return pack_linear(get(layer.self_attn), ops) if layer.fuse else empty

        self.mats = (
            [layer.input_layernorm.weight.detach() for layer in layers],
            [pack_linear(a.q_proj, ops) for a in attn],
            [pack_linear(a.k_proj, ops) for a in attn],
            [pack_linear(a.to_hidden[0], ops) for a in attn],
            [pack_linear(a.to_out[0], ops) for a in attn],
            [a.group_norm.weight.detach() for a in attn],
            [select(layer, lambda a: a.k_select.fc1) for layer in layers],
            [select(layer, lambda a: a.k_select.fc2) for layer in layers],
            [select(layer, lambda a: a.v_select.fc1) for layer in layers],
            [select(layer, lambda a: a.v_select.fc2) for layer in layers],
            [dense(layer, lambda a: a.k_norm.weight) for layer in layers],
            [dense(layer, lambda a: a.v_norm.weight) for layer in layers],
        )
        retention = attn[0].retention
        self.consts = (retention.inv_freq, retention.log_gamma)
        self.emb = model.model.embed_tokens.weight.detach()
        self.norm_f = model.model.norm.weight.detach()
        self.head = pack_linear(model.lm_head, ops)
        self.dims = (cfg.num_heads, cfg.dense_block_layers, float(attn[0].k_scale), float(cfg.rms_norm_eps))

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        return self.ops.dense_retnet_decode(
            batch.input_ids, batch.positions, batch.slot_ids, self.emb, *self.mats,
            [s["S"] for s in self.states], *self.consts, self.norm_f, self.head, *self.dims,
        )  # fmt: skip


class FusedDenseMambaDecoder:
    """DenseMamba: Mamba-1 layers (matrices packed) with the dense fusion of the last m layers' pre-gate
    SSM outputs."""

    def __init__(self, model: DenseMambaLM, states: States, ops: Any) -> None:
        self.model, self.states, self.ops = model, states, ops
        layers = list(model.backbone.layers)
        mixers = [layer.mixer for layer in layers]
        empty = torch.empty(0)

        def bias(linear: nn.Module) -> torch.Tensor:
            return empty if linear.bias is None else linear.bias.detach()

        self.mats = (
            [layer.norm.weight.detach() for layer in layers],
            [pack_linear(m.in_proj, ops) for m in mixers],
            [bias(m.in_proj) for m in mixers],
            [m.conv1d.weight.detach().squeeze(1).contiguous() for m in mixers],  # [E, K]
            [bias(m.conv1d) for m in mixers],
            [pack_linear(m.x_proj, ops) for m in mixers],
            [pack_linear(m.dt_proj, ops) for m in mixers],
            [m.dt_bias_f.contiguous() for m in mixers],
            [m.A.contiguous() for m in mixers],  # [E, N]
            [m.D_f.contiguous() for m in mixers],
            [pack_linear(m.out_proj, ops) for m in mixers],
            [bias(m.out_proj) for m in mixers],
            [pack_linear(m.y_select.fc1, ops) if layer.fuse else empty for layer, m in zip(layers, mixers)],
            [pack_linear(m.y_select.fc2, ops) if layer.fuse else empty for layer, m in zip(layers, mixers)],
            [m.y_norm.weight.detach() if layer.fuse else empty for layer, m in zip(layers, mixers)],
        )
        self.emb = model.backbone.embeddings.weight.detach()
        self.norm_f = model.backbone.norm_f.weight.detach()
        self.head = pack_linear(model.lm_head, ops)
        self.dims = (model.dense_block_layers, float(model.cfg.norm_eps))

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        st = self.states
        return self.ops.dense_mamba_decode(
            batch.input_ids, batch.slot_ids, self.emb, *self.mats, [s["conv"] for s in st], [s["ssm"] for s in st],
            self.norm_f, self.head, *self.dims,
        )  # fmt: skip
