"""``--cpu-decode fused`` for the LLaMA-layout Transformer baseline: the whole float32 decode step in one
C++ call (``rnnserve/kernels/cpu_decode/transformer.cpp``): RMSNorm, q/k/v in one packed GEMM, RoPE, the
new key and value written into the engine's paged KV cache in place, attention over each sequence's
cached positions through its block table (GQA: the query heads of a KV head together), o_proj, gate/up
in one packed GEMM, SwiGLU, down_proj, final norm and head. Weights are packed once into panels.h's
16-column panels, float32 or, after ``--quantization int8``, int8 with per-channel scales (activations
and the KV cache stay float32). The torch ``model.decode`` stays the reference it is tested against
(tests/engine/test_cpu_decode_transformer.py).

``engine.cpu_decode.fused_decoder`` dispatches here for ``TransformerLM``; ``unsupported_reason`` says
why a model cannot use the path (the runner then decodes with the torch path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnserve.models.base import DecodeBatch, KVCaches, States
from rnnserve.models.layers import Int8Linear
from rnnserve.models.transformer import TransformerLM


def unsupported_reason(model: TransformerLM) -> str | None:
    """Why the fused path cannot serve this Transformer (None when it can)."""
    cfg = model.cfg
    if cfg.arch != "llama":
        return f"the fused CPU decode of the Transformer baseline runs the LLaMA layout (not {cfg.arch})"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"the fused CPU decode runs float32 on the CPU (model: {model.dtype} on {model.device.type})"
    for layer in model.layers:
        for group in (_qkv(layer), _gate_up(layer)):
            if len({isinstance(m, Int8Linear) for m in group}) > 1:
                return "the fused CPU decode needs q/k/v (gate/up) all float32 or all int8"
    return None


def _qkv(layer: nn.Module) -> list[nn.Module]:
    a = layer.self_attn
    return [a.q_proj, a.k_proj, a.v_proj]


def _gate_up(layer: nn.Module) -> list[nn.Module]:
    return [layer.mlp.gate_proj, layer.mlp.up_proj]


def _packed(linears: list[nn.Module], ops: Any) -> torch.Tensor:
    """Linear layers with the same input, their outputs stacked ([q; k; v], [gate; up]), packed once into
    the kernels' panels: float32 [ceil(N/16), K, 16], or int8 [ceil(N/16), K + 4, 16] with per-channel
    scales for ``Int8Linear`` layers. A copy: the model keeps its own weights for the torch prefill."""
    if isinstance(linears[0], Int8Linear):
        q = torch.cat([m.qweight for m in linears]).contiguous()  # [N, K] int8
        return ops.pack_weight_int8(q, torch.cat([m.scale for m in linears]).contiguous())
    w = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight.detach()
    return ops.pack_weight(w.t(), True) if w.t().is_contiguous() else ops.pack_weight(w.contiguous(), False)


def _bias(linears: list[nn.Module]) -> torch.Tensor:
    """The stacked bias [N] float32 (zeros for a layer without one); empty when none has one."""
    if all(m.bias is None for m in linears):
        return torch.empty(0)
    parts = [
        torch.zeros(m.out_features if isinstance(m, Int8Linear) else m.weight.shape[0]) if m.bias is None
        else m.bias.detach().float()
        for m in linears
    ]  # fmt: skip
    return torch.cat(parts).contiguous()


class FusedTransformerDecoder:
    """The LLaMA decode step with every layer's weights packed once (``_packed``); the KV cache is the
    one each batch's ``kv`` metadata hands over, read and appended to in place."""

    def __init__(self, model: TransformerLM, ops: Any) -> None:
        self.model, self.ops = model, ops
        cfg = model.cfg
        layers = list(model.layers)
        with torch.no_grad():
            self.args = dict(
                norm1_w=[layer.input_layernorm.weight.detach() for layer in layers],
                qkv_w=[_packed(_qkv(layer), ops) for layer in layers],  # [(H + 2 Hkv) hd, D] packed
                qkv_b=[_bias(_qkv(layer)) for layer in layers],
                o_w=[_packed([layer.self_attn.o_proj], ops) for layer in layers],  # [D, H hd] packed
                o_b=[_bias([layer.self_attn.o_proj]) for layer in layers],
                norm2_w=[layer.post_attention_layernorm.weight.detach() for layer in layers],
                gu_w=[_packed(_gate_up(layer), ops) for layer in layers],  # [2I, D] packed
                gu_b=[_bias(_gate_up(layer)) for layer in layers],
                down_w=[_packed([layer.mlp.down_proj], ops) for layer in layers],  # [D, I] packed
                down_b=[_bias([layer.mlp.down_proj]) for layer in layers],
            )
            self.head_w = _packed([model.lm_head], ops)  # a tied embedding is packed as a copy too
        self.emb = model.embed_tokens.weight.detach()
        self.norm_f = model.norm.weight.detach()
        self.dims = (
            cfg.vocab_size,
            cfg.norm_eps,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            layers[0].self_attn.scale,
        )
        # The per-layer key and value lists of the last KV cache seen (the engine's stays the same).
        self._caches: KVCaches | None = None
        self._kv_lists: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        kv = self.model._kv(batch.kv)  # refuses positions past max_model_len, as the torch path does
        if kv.caches is not self._caches:
            self._caches = kv.caches
            self._kv_lists = ([k for k, _ in kv.caches], [v for _, v in kv.caches])
        a = self.args
        return self.ops.llama_decode(
            batch.input_ids, batch.positions, self.emb, a["norm1_w"], a["qkv_w"], a["qkv_b"], a["o_w"], a["o_b"],
            a["norm2_w"], a["gu_w"], a["gu_b"], a["down_w"], a["down_b"], *self._kv_lists, kv.block_tables,
            kv.seq_lens, kv.slot_mapping, self.model.inv_freq, self.norm_f, self.head_w, *self.dims,
        )  # fmt: skip


def make_decoder(model: TransformerLM, states: States, ops: Any) -> FusedTransformerDecoder:
    """The fused decoder of a LLaMA-layout ``TransformerLM`` (callable ``DecodeBatch -> logits [B, V]``);
    it keeps no recurrent state (``states`` is empty), only the batch's KV cache."""
    return FusedTransformerDecoder(model, ops)
