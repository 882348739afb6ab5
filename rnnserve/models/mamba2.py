"""Mamba-2 (SSD): transformers ``Mamba2ForCausalLM`` checkpoints.

Per layer and sequence the state is the conv cache ``conv [E + 2GN, K-1]`` (model dtype; the last K-1
inputs of the depthwise conv over the concatenated x, B, C channels) and the SSM state
``ssm [H, N, P]`` (fp32; the shared ``linear_recurrence`` layout ``[H, K, V]`` with K = N, V = P).

One mixer step, per token (H heads of dim P, G groups of B/C of size N, head h reads group h // (H/G)):

    z, xBC, dt = in_proj(norm(h))                 # [E], [E + 2GN], [H]
    x, B, C    = split(silu(conv1d(xBC)))         # [H, P], [G, N], [G, N]
    Δ          = clamp(softplus(dt + dt_bias), *time_step_limit)            # [H] fp32
    S_h        ← exp(Δ_h A_h) S_h + B_gᵀ (Δ_h x_h)                          # [N, P], A = -exp(A_log)
    y_h        = C_g S_h + D_h x_h                                          # [P]
    h         += out_proj(rms_norm_per_group(y ⊙ silu(z)) ⊙ norm.weight)

which is the scalar-decay linear recurrence with q = C, k = B, v = Δx, log-decay = ΔA. The gated norm
multiplies by the gate before normalising (``norm_before_gate=False``) and normalises each of the G
groups of E/G channels separately, as mamba_ssm and transformers 5.24 do (transformers 4.x and 5.x up
to at least 5.17 normalise over all E channels, which differs whenever n_groups > 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.dispatch import Backend, get_kernel
from rnnserve.kernels.linear_recurrence import cpu as linear_recurrence_cpu
from rnnserve.kernels.prefill_linear.cpu import linear_prefill
from rnnserve.models.base import DecodeBatch, MixedBatch, PrefillBatch, RecurrentLM, States, StateSpec
from rnnserve.models.layers import RMSNorm, gated_rms_norm, lm_logits, quantize_int8, use_column_major_weight
from rnnserve.models.weights import WeightsMapper, fp32_copy_loader, load_weights, set_weight_loader


@dataclass(frozen=True)
class Mamba2Config:
    """The numbers a Mamba-2 checkpoint's config.json fixes (transformers ``Mamba2Config`` names)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int
    norm_eps: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.n_groups:
            raise ValueError(f"mamba2: num_heads {self.num_heads} is not a multiple of n_groups {self.n_groups}")
        if self.conv_kernel < 2:
            raise ValueError(f"mamba2: conv_kernel must be >= 2, got {self.conv_kernel}")

    @property
    def intermediate_size(self) -> int:
        """E = num_heads * head_dim (= expand * hidden_size, checked by from_hf)."""
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: x (E), B and C (G*N each)."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @classmethod
    def from_hf(cls, c: dict) -> Mamba2Config:
        hidden = c["hidden_size"]
        heads = c["num_heads"]
        head_dim = c["head_dim"]
        expand = c.get("expand", 2)
        if int(expand * hidden) != heads * head_dim:
            raise ValueError(
                f"mamba2 config: expand * hidden_size ({int(expand * hidden)}) != num_heads * head_dim "
                f"({heads * head_dim})"
            )
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"mamba2 config: hidden_act {act!r} is not supported (only silu)")
        limit = c.get("time_step_limit") or (0.0, math.inf)
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            head_dim=head_dim,
            state_size=c["state_size"],
            n_groups=c.get("n_groups", 1),
            conv_kernel=c.get("conv_kernel", 4),
            norm_eps=c.get("layer_norm_epsilon", 1e-5),
            use_bias=c.get("use_bias", False),
            use_conv_bias=c.get("use_conv_bias", True),
            residual_in_fp32=c.get("residual_in_fp32", True),
            time_step_limit=(_json_float(limit[0]), _json_float(limit[1])),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


def _json_float(value: float | str | dict) -> float:
    """A float from config.json: a number, "Infinity", or transformers 5's ``{"__float__": "Infinity"}``
    (JSON itself has no infinity)."""
    if isinstance(value, dict):
        value = value["__float__"]
    return float(value)


class Mamba2Mixer(nn.Module):
    """One SSD mixer; parameter names are the checkpoint's (``backbone.layers.{i}.mixer.*``)."""

    def __init__(self, cfg: Mamba2Config, backend: Backend) -> None:
        super().__init__()
        self.cfg = cfg
        e, c, h = cfg.intermediate_size, cfg.conv_dim, cfg.num_heads
        self.in_proj = nn.Linear(cfg.hidden_size, e + c + h, bias=cfg.use_bias)  # -> z, xBC, dt
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(c, 1, cfg.conv_kernel))  # [C, 1, K] as nn.Conv1d
        self.conv1d.bias = nn.Parameter(torch.empty(c)) if cfg.use_conv_bias else None
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.norm = RMSNorm(e, cfg.norm_eps)  # gated, per group: see _output
        self.out_proj = nn.Linear(e, cfg.hidden_size, bias=cfg.use_bias)
        self.conv_chunk = get_kernel("causal_conv1d.chunk", backend)
        self.conv_step = get_kernel("causal_conv1d.recurrent", backend)
        self.scan_chunk = get_kernel("linear_recurrence.chunk", backend)
        self.scan_step = get_kernel("linear_recurrence.recurrent", backend)
        # The prompt scan on the CPU (see _scan_chunks): the C++ SSD kernel where it runs.
        self.ssd_chunk = linear_recurrence_cpu.ssd_varlen
        # The C++ prefill GEMM (prefill_linear/cpu.py's linear_prefill, shared with Mamba-1): None where
        # it does not take the inputs (few rows, not float32 on the CPU); None here: torch's F.linear.
        self.prefill_linear: Callable[..., torch.Tensor | None] | None = linear_prefill
        # fp32 copies of the per-head SSM parameters (set by ``set_fp32_params``): A = -exp(A_log),
        # dt_bias and D stay exact when the model runs in bf16/fp16.
        self.A = torch.empty(0)
        self.dt_bias_f = torch.empty(0)
        self.D_f = torch.empty(0)

    def set_fp32_params(self, a_log: torch.Tensor, dt_bias: torch.Tensor, d: torch.Tensor) -> None:
        dev = self.A_log.device
        self.A = -torch.exp(a_log.to(device=dev, dtype=torch.float32))  # [H]
        self.dt_bias_f = dt_bias.to(device=dev, dtype=torch.float32)  # [H]
        self.D_f = d.to(device=dev, dtype=torch.float32)  # [H]

    def keep_fp32_params(self) -> None:
        """Load hooks on A_log, dt_bias and D that also set their fp32 copies (A = -exp(A_log)) straight
        from the checkpoint tensors, whatever the model dtype. Every family with this mixer calls it in
        its ``load_weights`` (hooks attach to the materialised parameters)."""
        set_weight_loader(self.A_log, fp32_copy_loader(self, "A", lambda a_log: -torch.exp(a_log)))
        set_weight_loader(self.dt_bias, fp32_copy_loader(self, "dt_bias_f"))
        set_weight_loader(self.D, fp32_copy_loader(self, "D_f"))

    def _split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """in_proj -> z [T, E], xBC [T, E + 2GN], Δ [T, H] (fp32, softplus and clamped)."""
        cfg = self.cfg
        zxbcdt = self._linear(h, self.in_proj)
        z, xbc, dt = zxbcdt.split([cfg.intermediate_size, cfg.conv_dim, cfg.num_heads], dim=-1)
        delta = linear_recurrence_cpu.mamba2_delta(dt, self.dt_bias_f, cfg.time_step_limit)
        if delta is not None:
            return z, xbc, delta
        dt = F.softplus(dt.float() + self.dt_bias_f).clamp(cfg.time_step_limit[0], cfg.time_step_limit[1])
        return z, xbc, dt

    def _ssm_inputs(
        self, xbc: torch.Tensor, dt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv output [T, E + 2GN] and Δ [T, H] -> x [T, H, P], q = C [T, G, N], k = B [T, G, N],
        v = Δx [T, H, P] fp32, log_decay = ΔA [T, H] fp32."""
        cfg = self.cfg
        t = xbc.shape[0]
        gn = cfg.n_groups * cfg.state_size
        x, b, c = xbc.split([cfg.intermediate_size, gn, gn], dim=-1)
        x = x.reshape(t, cfg.num_heads, cfg.head_dim)
        v = x.float() * dt.unsqueeze(-1)
        return (
            x,
            c.reshape(t, cfg.n_groups, cfg.state_size),
            b.reshape(t, cfg.n_groups, cfg.state_size),
            v,
            dt * self.A,
        )

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y [T, H, P] (fp32 scan output) + D x, gated group norm, out_proj -> [T, D]. On the CPU the D skip,
        the gate and the norm are one pass of the C++ kernel over y (in place: y is the scan's own output)."""
        cfg = self.cfg
        normed = linear_recurrence_cpu.gated_rms_norm_(
            y.flatten(1), z, self.norm.weight, cfg.norm_eps, cfg.n_groups, x.flatten(1), self.D_f
        )
        if normed is None:
            y = torch.addcmul(y.float(), self.D_f.unsqueeze(-1), x.float())  # [T, H, P]
            normed = gated_rms_norm(y.flatten(1), z, self.norm.weight, cfg.norm_eps, groups=cfg.n_groups)
        return self._linear(normed, self.out_proj)

    def _linear(self, x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
        """linear(x) for x [M, in]: through ``prefill_linear`` where it takes the inputs (the C++ prefill
        GEMM: float32 on the CPU, many rows, an nn.Linear); else the module itself."""
        if self.prefill_linear is not None and isinstance(linear, nn.Linear):
            out = self.prefill_linear(x, linear.weight, linear.bias)
            if out is not None:
                return out
        return linear(x)

    def _scan_chunks(
        self,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        ssm_state: torch.Tensor,
        varlen: torch.Tensor | Varlen,
        slot_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv output [T, E + 2GN] and Δ [T, H] of prompt tokens -> (scan output y [T, H, P], x [T, H, P]),
        the states at slot_ids updated in place. On the CPU through ``linear_recurrence.cpu.ssd_varlen``
        (the C++ SSD kernel, which scales x by Δ itself and reads x, B, C as column views of xbc; the
        chunked torch scan where it cannot run); elsewhere the dispatched chunk kernel."""
        cfg = self.cfg
        if xbc.device.type == "cpu":
            t, gn = xbc.shape[0], cfg.n_groups * cfg.state_size
            x, b, c = xbc.split([cfg.intermediate_size, gn, gn], dim=-1)
            x = x.view(t, cfg.num_heads, cfg.head_dim)
            q, k = c.view(t, cfg.n_groups, cfg.state_size), b.view(t, cfg.n_groups, cfg.state_size)
            return self.ssd_chunk(q, k, x, dt, None, None, ssm_state, varlen, slot_ids, decay_rate=self.A), x
        x, q, k, v, log_decay = self._ssm_inputs(xbc, dt)
        return self.scan_chunk(q, k, v, log_decay, ssm_state, varlen, slot_ids), x

    def prefill(
        self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, batch: PrefillBatch
    ) -> torch.Tensor:
        """h [T, D] packed normalised hidden states -> [T, D]; states updated in place by slot."""
        z, xbc, dt = self._split(h)
        bias = self.conv1d.bias
        xbc = self.conv_chunk(
            xbc, self.conv1d.weight.squeeze(1), bias, conv_state, batch.varlen, batch.slot_ids, "silu"
        )
        y, x = self._scan_chunks(xbc, dt, ssm_state, batch.varlen, batch.slot_ids)  # [T, H, P]
        return self._output(y, x, z)

    def decode(
        self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, slot_ids: torch.Tensor
    ) -> torch.Tensor:
        """h [B, D], one token per sequence -> [B, D]; states updated in place by slot."""
        z, xbc, dt = self._split(h)
        xbc = self.conv_step(xbc, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, slot_ids, "silu")
        x, q, k, v, log_decay = self._ssm_inputs(xbc, dt)
        y = self.scan_step(q, k, v, log_decay, ssm_state, slot_ids)  # [B, H, P]
        return self._output(y, x, z)

    def mixed(
        self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, batch: MixedBatch
    ) -> torch.Tensor:
        """h [n + T, D]: n decode rows, then T prompt tokens -> [n + T, D]. in_proj, the gated norm and
        out_proj take all rows at once (each weight read once per step); the conv and the scan run
        their step kernel on the decode rows and their chunk kernel on the prompt rows."""
        n, dec, pre = batch.num_decodes, batch.decode, batch.prefill
        w, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        z, xbc, dt = self._split(h)
        xbc = torch.cat(
            [
                self.conv_step(xbc[:n], conv_state, w, bias, dec.slot_ids, "silu"),
                self.conv_chunk(xbc[n:], w, bias, conv_state, pre.varlen, pre.slot_ids, "silu"),
            ]
        )
        x, q, k, v, log_decay = self._ssm_inputs(xbc[:n], dt[:n])
        y_pre, x_pre = self._scan_chunks(xbc[n:], dt[n:], ssm_state, pre.varlen, pre.slot_ids)
        y = torch.cat([self.scan_step(q, k, v, log_decay, ssm_state, dec.slot_ids).to(y_pre.dtype), y_pre])
        return self._output(y, torch.cat([x, x_pre]), z)  # [n + T, H, P]


class Mamba2Block(nn.Module):
    def __init__(self, cfg: Mamba2Config, backend: Backend) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg, backend)


class Mamba2Backbone(nn.Module):
    def __init__(self, cfg: Mamba2Config, backend: Backend) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Mamba2Block(cfg, backend) for _ in range(cfg.num_layers)])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Mamba2LM(RecurrentLM):
    """Mamba-2 causal LM; module names follow transformers (``backbone.*``, ``lm_head``)."""

    def __init__(self, cfg: Mamba2Config, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.max_model_len = None
        self.backbone = Mamba2Backbone(cfg, backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> Mamba2LM:
        return cls(Mamba2Config.from_hf(config), backend)

    def state_specs(self) -> list[list[StateSpec]]:
        cfg = self.cfg
        conv = StateSpec("conv", (cfg.conv_dim, cfg.conv_kernel - 1), self.dtype)
        ssm = StateSpec("ssm", (cfg.num_heads, cfg.state_size, cfg.head_dim), torch.float32)
        return [[conv, ssm] for _ in range(cfg.num_layers)]

    # ------------------------------------------------------------------ loading

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for layer in self.backbone.layers:
            layer.mixer.keep_fp32_params()
        mapper = WeightsMapper(
            # Original mamba_ssm checkpoints say ``backbone.embedding``; transformers renames it on load too.
            prefixes=(("backbone.embedding.", "backbone.embeddings."),),
            # Tied: the embedding is the head.
            ignore_suffixes=("lm_head.weight",) if self.cfg.tie_word_embeddings else (),
        )
        return load_weights(self, weights, mapper)

    def post_load(self) -> None:
        if self.device.type == "cpu":
            for layer in self.backbone.layers:
                for linear in (layer.mixer.in_proj, layer.mixer.out_proj):
                    use_column_major_weight(linear)
            if not self.cfg.tie_word_embeddings:
                use_column_major_weight(self.lm_head)

    def quantize_int8(self) -> None:
        """int8 in_proj, out_proj and head (all the weight bytes but the conv, norms and embedding)."""
        for layer in self.backbone.layers:
            layer.mixer.in_proj = quantize_int8(layer.mixer.in_proj)
            layer.mixer.out_proj = quantize_int8(layer.mixer.out_proj)
        self.lm_head = quantize_int8(self.lm_head)  # a tied embedding keeps its fp32 weight for lookups

    # ------------------------------------------------------------------ forward

    def _residual_dtype(self) -> torch.dtype:
        return torch.float32 if self.cfg.residual_in_fp32 else self.dtype

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.backbone.norm_f(h), self.lm_head)

    @torch.no_grad()
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [T, D]
        layers = self.backbone.layers
        hn = layers[0].norm(h)
        for i, (layer, st) in enumerate(zip(layers, states)):
            out = layer.mixer.prefill(hn, st["conv"], st["ssm"], batch)
            if i + 1 == len(layers):
                h.add_(out)
                break
            # The residual add and the next layer's norm in one pass on the CPU (float32).
            norm = layers[i + 1].norm
            hn = linear_recurrence_cpu.add_rms_norm_(h, out, norm.weight, norm.eps)
            if hn is None:
                hn = norm(h.add_(out))
        return self._logits(h.index_select(0, batch.logits_indices))

    @torch.no_grad()
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [B, D]
        for layer, st in zip(self.backbone.layers, states):
            h.add_(layer.mixer.decode(layer.norm(h), st["conv"], st["ssm"], batch.slot_ids))
        return self._logits(h)

    @torch.no_grad()
    def mixed(self, batch: MixedBatch, states: States) -> torch.Tensor:
        """One pass for decodes and prompt chunks together (see ``Mamba2Mixer.mixed``)."""
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [n + T, D]
        for layer, st in zip(self.backbone.layers, states):
            h.add_(layer.mixer.mixed(layer.norm(h), st["conv"], st["ssm"], batch))
        return self._logits(h.index_select(0, batch.logits_indices))
