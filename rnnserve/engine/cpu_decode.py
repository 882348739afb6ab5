"""``--cpu-decode fused``: the whole decode step of a float32 Mamba-1 / Mamba-2 model in one C++ call
(``rnnserve/kernels/cpu_decode``): AVX2 GEMMs on weights packed once into 16-column panels (float32, or
int8 with per-channel scales for ``--quantization int8``'s layers), and per layer one fused pass for the
conv, the step size, the state update (in place, by slot) and the gate. The torch ``model.decode`` stays
the reference it is tested against (tests/engine/test_cpu_decode.py).

``fused_decoder`` returns None, with the reason logged, where the path does not apply (another family,
another dtype or device, non-contiguous state pools) or the extension cannot be built;
the runner then decodes with the torch path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from rnnserve.engine import cpu_decode_families, cpu_decode_transformer
from rnnserve.engine.cpu_decode_families import linear_bias, pack_linear
from rnnserve.kernels import cpu_decode
from rnnserve.kernels.cpu_decode import families as cpu_decode_rwkv_retnet
from rnnserve.kernels.cpu_decode import transformer as cpu_decode_transformer_kernels
from rnnserve.models.base import DecodeBatch, RecurrentLM, States
from rnnserve.models.mamba import MambaLM
from rnnserve.models.mamba2 import Mamba2LM
from rnnserve.models.transformer import TransformerLM

logger = logging.getLogger(__name__)


def _head(model: RecurrentLM, ops) -> tuple[torch.Tensor, bool]:
    """The head weight packed (a tied embedding [V, D] or a column-major [D, V] alike); the flag is the
    ops' ``head_kn``, unused for a packed head."""
    return pack_linear(model.lm_head, ops), False


def unsupported_reason(model: RecurrentLM, states: States) -> str | None:
    """Why the fused path cannot serve this model (None when it can)."""
    if isinstance(model, cpu_decode_families.FAMILIES):  # before MambaLM: DenseMambaLM is one
        return cpu_decode_families.unsupported_reason(model, states)
    if isinstance(model, TransformerLM):
        return cpu_decode_transformer.unsupported_reason(model)
    if not isinstance(model, MambaLM | Mamba2LM):
        fused = "Mamba, Mamba-2, RWKV-4, RWKV-7, RetNet, DenseRetNet, DenseMamba and the LLaMA baseline do"
        return f"{type(model).__name__} has no fused CPU decode ({fused})"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"the fused CPU decode runs float32 on the CPU (model: {model.dtype} on {model.device.type})"
    if not model.cfg.residual_in_fp32:
        return "the fused CPU decode keeps the residual in float32 (residual_in_fp32 is false)"
    for layer in states:
        for t in layer.values():
            if t.dtype != torch.float32 or not t[0].is_contiguous():
                return "the fused CPU decode needs float32 state pools contiguous per slot"
    return None


def fused_decoder(model: RecurrentLM, states: States) -> Callable[[DecodeBatch], torch.Tensor] | None:
    """The fused decode of ``model`` over ``states`` (a callable ``DecodeBatch -> logits [B, V]``), or
    None with the reason logged."""
    reason = unsupported_reason(model, states)
    if reason is not None:
        logger.warning("--cpu-decode fused: %s; decoding with the torch path", reason)
        return None
    if isinstance(model, cpu_decode_families.FAMILIES):
        rnn_ops = cpu_decode_rwkv_retnet.load()
        return None if rnn_ops is None else cpu_decode_families.make_decoder(model, states, rnn_ops)
    if isinstance(model, TransformerLM):
        llama_ops = cpu_decode_transformer_kernels.load()
        return None if llama_ops is None else cpu_decode_transformer.make_decoder(model, states, llama_ops)
    ops = cpu_decode.load()
    if ops is None:
        return None
    return (
        FusedMambaDecoder(model, states, ops) if isinstance(model, MambaLM) else FusedMamba2Decoder(model, states, ops)
    )


class FusedMambaDecoder:
    """Mamba-1: every layer's weights gathered once, the matrices packed (``_packed``)."""

    def __init__(self, model: MambaLM, states: States, ops) -> None:
        self.model, self.states, self.ops = model, states, ops
        mixers = [layer.mixer for layer in model.backbone.layers]
        self.head_w, self.head_kn = _head(model, ops)
        self.args = dict(
            emb=model.backbone.embeddings.weight.detach(),
            norm_w=[layer.norm.weight.detach() for layer in model.backbone.layers],
            in_w=[pack_linear(m.in_proj, ops) for m in mixers],
            in_b=[linear_bias(m.in_proj) for m in mixers],
            conv_w=[m.conv1d.weight.detach().squeeze(1).contiguous() for m in mixers],  # [E, K]
            conv_b=[linear_bias(m.conv1d) for m in mixers],
            x_w=[pack_linear(m.x_proj, ops) for m in mixers],  # [ceil((R + 2N) / 16), E, 16]
            dt_w=[pack_linear(m.dt_proj, ops) for m in mixers],  # [E / 16, R, 16]
            dt_b=[m.dt_bias_f.contiguous() for m in mixers],
            A=[m.A.contiguous() for m in mixers],  # [E, N]
            D=[m.D_f.contiguous() for m in mixers],
            out_w=[pack_linear(m.out_proj, ops) for m in mixers],  # [D / 16, E, 16]
            out_b=[linear_bias(m.out_proj) for m in mixers],
        )
        self.norm_f = model.backbone.norm_f.weight.detach()
        self.eps = model.cfg.norm_eps

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        # The state tensors are looked up per step (48 dict reads), so a pool that swaps one is followed.
        a = self.args
        return self.ops.mamba1_decode(
            batch.input_ids, batch.slot_ids, a["emb"], a["norm_w"], a["in_w"], a["in_b"], a["conv_w"],
            a["conv_b"], a["x_w"], a["dt_w"], a["dt_b"], a["A"], a["D"], a["out_w"], a["out_b"],
            [st["conv"] for st in self.states], [st["ssm"] for st in self.states],
            self.norm_f, self.head_w, self.head_kn, self.eps,
        )  # fmt: skip


class FusedMamba2Decoder:
    """Mamba-2: every layer's weights gathered once and handed to a C++ ``Mamba2Model`` with the state
    pools, so a step passes only the token and slot ids (``mamba2_decode``'s ~300 tensor arguments cost
    ~0.15 ms of dispatch per step); the state [S, H, N, P] is updated in place. ``args`` / ``dims`` keep
    the per-call form for ``ops.mamba2_decode`` (scripts/bench_decode_step.py's baseline arm).

    The state pass (24 x 24 x 128 x 64 fp32 per sequence, read and written each step: 19 MB each way)
    is bound by DRAM, and by the page size: with the pools in 2 MB pages instead of 4 KB ones it ran
    20-30% faster (one thread, batch 8 and 32, alternated in one process), the whole step 4-7% faster."""

    def __init__(self, model: Mamba2LM, states: States, ops) -> None:
        self.model, self.states, self.ops = model, states, ops
        cfg = model.cfg
        mixers = [layer.mixer for layer in model.backbone.layers]
        self.head_w, self.head_kn = _head(model, ops)
        self.args = dict(
            emb=model.backbone.embeddings.weight.detach(),
            norm_w=[layer.norm.weight.detach() for layer in model.backbone.layers],
            in_w=[pack_linear(m.in_proj, ops) for m in mixers],  # [ceil((E + C + H) / 16), D, 16]
            in_b=[linear_bias(m.in_proj) for m in mixers],
            conv_w=[m.conv1d.weight.detach().squeeze(1).contiguous() for m in mixers],  # [C, K]
            conv_b=[torch.empty(0) if m.conv1d.bias is None else m.conv1d.bias.detach() for m in mixers],
            dt_bias=[m.dt_bias_f.contiguous() for m in mixers],
            A=[m.A.contiguous() for m in mixers],
            D=[m.D_f.contiguous() for m in mixers],
            gnorm_w=[m.norm.weight.detach() for m in mixers],
            out_w=[pack_linear(m.out_proj, ops) for m in mixers],
            out_b=[linear_bias(m.out_proj) for m in mixers],
        )
        self.norm_f = model.backbone.norm_f.weight.detach()
        self.eps = cfg.norm_eps
        lo, hi = cfg.time_step_limit
        self.dims = (cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size, float(lo), float(min(hi, math.inf)))
        self._pools = self._current_pools()
        # args' values in the constructor's order (emb, norm_w, in_w, ..., out_b).
        self._model = torch.classes.rnnserve_cpu.Mamba2Model(
            *self.args.values(), *self._pools, self.norm_f, self.head_w, self.head_kn, self.eps, *self.dims
        )

    def _current_pools(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [st["conv"] for st in self.states], [st["ssm"] for st in self.states]

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        # The state tensors are looked up per step (48 dict reads and identity checks), so a pool that
        # swaps one is followed: the C++ model is rebound to the new tensors.
        conv, ssm = self._pools
        if any(st["conv"] is not c or st["ssm"] is not s for st, c, s in zip(self.states, conv, ssm)):
            self._pools = self._current_pools()
            self._model.set_states(*self._pools)
        return self._model.step(batch.input_ids, batch.slot_ids)
