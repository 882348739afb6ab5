"""Mamba-1: transformers ``MambaForCausalLM`` folders and original ``mamba_ssm`` checkpoints.

Per layer and sequence the state is the conv cache ``conv [E, K-1]`` (model dtype; the last K-1
inputs of the depthwise conv) and the SSM state ``ssm [E, N]`` (fp32).

One block, per token (D hidden, E = expand·D inner channels, N state size, R = dt rank):

    x, z   = in_proj(rms_norm(h))                    # [E], [E]
    x      = silu(conv1d(x))                         # causal over time, width K
    δ, B, C = x_proj(x)                              # [R], [N], [N]
    Δ      = softplus(dt_proj.weight δ + dt_proj.bias)                      # [E] fp32
    s      ← exp(Δ ⊗ A) ⊙ s + (Δ ⊙ x) ⊗ B           # [E, N] fp32, A = -exp(A_log)
    y      = (s C + D ⊙ x) ⊙ silu(z)
    h     += out_proj(y)                             # residual in fp32 when residual_in_fp32

then ``norm_f`` and ``lm_head`` (tied to the embedding or not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend, get_kernel
from rnnserve.kernels.prefill_linear.cpu import linear_prefill
from rnnserve.models.base import DecodeBatch, MixedBatch, PrefillBatch, RecurrentLM, States, StateSpec
from rnnserve.models.layers import RMSNorm, lm_logits, quantize_int8, rms_norm, use_column_major_weight
from rnnserve.models.weights import WeightsMapper, fp32_copy_loader, load_weights, set_weight_loader


@dataclass(frozen=True)
class MambaConfig:
    """The numbers a Mamba checkpoint's config fixes (transformers ``MambaConfig`` names)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    state_size: int = 16
    conv_kernel: int = 4
    time_step_rank: int = 0  # 0: ceil(hidden_size / 16)
    norm_eps: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.conv_kernel < 2:
            raise ValueError(f"mamba: conv_kernel must be >= 2, got {self.conv_kernel}")
        for name in ("vocab_size", "hidden_size", "num_layers", "intermediate_size", "state_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"mamba: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def dt_rank(self) -> int:
        return self.time_step_rank or math.ceil(self.hidden_size / 16)

    @classmethod
    def from_hf(cls, c: dict) -> MambaConfig:
        """From a transformers ``MambaConfig`` dict, or an original mamba_ssm config.json
        (``d_model``, ``n_layer``, ``ssm_cfg``, ``pad_vocab_size_multiple``, ``tie_embeddings``)."""
        if "d_model" in c and "hidden_size" not in c:
            return cls._from_mamba_ssm(c)
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"mamba config: hidden_act {act!r} is not supported (only silu)")
        hidden = c["hidden_size"]
        rank = c.get("time_step_rank", "auto")
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            num_layers=c["num_hidden_layers"],
            intermediate_size=c.get("intermediate_size") or int(c.get("expand", 2) * hidden),
            state_size=c.get("state_size", 16),
            conv_kernel=c.get("conv_kernel", 4),
            time_step_rank=0 if rank == "auto" else int(rank),
            norm_eps=c.get("layer_norm_epsilon", 1e-5),
            use_bias=c.get("use_bias", False),
            use_conv_bias=c.get("use_conv_bias", True),
            residual_in_fp32=c.get("residual_in_fp32", True),
            tie_word_embeddings=c.get("tie_word_embeddings", True),
        )

    @classmethod
    def _from_mamba_ssm(cls, c: dict) -> MambaConfig:
        ssm = c.get("ssm_cfg") or {}
        layer = ssm.get("layer", "Mamba1")
        if layer != "Mamba1":
            raise ValueError(f"mamba_ssm config: layer {layer!r} is not Mamba-1 (only Mamba1 checkpoints load here)")
        if c.get("d_intermediate", 0) or c.get("attn_layer_idx"):
            raise ValueError(
                "mamba_ssm config: MLP or attention layers (d_intermediate, attn_layer_idx) are not supported"
            )
        if not c.get("rms_norm", True):
            raise ValueError("mamba_ssm config: rms_norm=false (LayerNorm blocks) is not supported")
        hidden = c["d_model"]
        vocab = c["vocab_size"]
        multiple = c.get("pad_vocab_size_multiple", 1)
        if vocab % multiple:
            vocab += multiple - vocab % multiple  # mamba_ssm pads the embedding the same way
        rank = ssm.get("dt_rank", "auto")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=c["n_layer"],
            intermediate_size=int(ssm.get("expand", 2) * hidden),
            state_size=ssm.get("d_state", 16),
            conv_kernel=ssm.get("d_conv", 4),
            time_step_rank=0 if rank == "auto" else int(rank),
            norm_eps=c.get("norm_epsilon", 1e-5),
            use_bias=ssm.get("bias", False),
            use_conv_bias=ssm.get("conv_bias", True),
            residual_in_fp32=c.get("residual_in_fp32", True),
            tie_word_embeddings=c.get("tie_embeddings", True),
        )


def is_mamba_ssm_config(c: dict) -> bool:
    """An original mamba_ssm config.json (no ``architectures`` / ``model_type``, but d_model + n_layer)."""
    return "d_model" in c and "n_layer" in c


class MambaMixer(nn.Module):
    """One selective-SSM mixer; parameter names are the checkpoint's (``backbone.layers.{i}.mixer.*``)."""

    def __init__(self, cfg: MambaConfig, backend: Backend) -> None:
        super().__init__()
        self.cfg = cfg
        e, n, r = cfg.intermediate_size, cfg.state_size, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * e, bias=cfg.use_bias)  # -> x, z
        self.conv1d = nn.Conv1d(e, e, cfg.conv_kernel, groups=e, bias=cfg.use_conv_bias)  # weight [E, 1, K]
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)  # -> δ, B, C
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))
        self.D = nn.Parameter(torch.empty(e))
        self.out_proj = nn.Linear(e, cfg.hidden_size, bias=cfg.use_bias)
        self.conv_chunk = get_kernel("causal_conv1d.chunk", backend)
        self.conv_step = get_kernel("causal_conv1d.recurrent", backend)
        self.scan_chunk = get_kernel("selective_scan.chunk", backend)
        self.scan_step = get_kernel("selective_scan.recurrent", backend)
        # Prefill projections: the C++ GEMM (prefill_linear/cpu.cpp) where it takes the inputs (float32
        # CPU, many rows), returning None elsewhere; None here: torch for every projection.
        self.prefill_linear: Callable[..., torch.Tensor | None] | None = linear_prefill
        # fp32 SSM parameters (keep_fp32_params' load hooks): A = -exp(A_log) [E, N], D [E],
        # dt_bias [E]; exact whatever the model dtype. Non-persistent: never in a state dict. Cast the
        # module before loading (as the loader does), not after: a later cast would round them too.
        self.register_buffer("A", torch.empty(0), persistent=False)
        self.register_buffer("D_f", torch.empty(0), persistent=False)
        self.register_buffer("dt_bias_f", torch.empty(0), persistent=False)

    def set_fp32_params(self, a_log: torch.Tensor, d: torch.Tensor, dt_bias: torch.Tensor) -> None:
        dev = self.A_log.device
        self.A = -torch.exp(a_log.to(device=dev, dtype=torch.float32))
        self.D_f = d.to(device=dev, dtype=torch.float32)
        self.dt_bias_f = dt_bias.to(device=dev, dtype=torch.float32)

    def keep_fp32_params(self) -> None:
        """Load hooks on A_log, D and dt_proj's bias that also set their fp32 copies (A = -exp(A_log))
        straight from the checkpoint tensors, whatever the model dtype. Every family with this mixer
        calls it in its ``load_weights`` (hooks attach to the materialised parameters)."""
        set_weight_loader(self.A_log, fp32_copy_loader(self, "A", lambda a_log: -torch.exp(a_log)))
        set_weight_loader(self.D, fp32_copy_loader(self, "D_f"))
        set_weight_loader(self.dt_proj.bias, fp32_copy_loader(self, "dt_bias_f"))

    def _x_dbl(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv output x [T, E] -> dt (pre-bias) [T, E], B [T, N], C [T, N]."""
        delta, b, c = self._split_dbc(self.x_proj(x))
        # dt_proj's bias is added in fp32 inside the scan (as transformers does).
        return F.linear(delta, self.dt_proj.weight), b, c

    def _x_dbl_prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_x_dbl`` of a prompt's rows: x_proj and dt_proj through ``_project`` (the prefill GEMM)."""
        delta, b, c = self._split_dbc(self._project(x, self.x_proj))
        return self._project(delta, self.dt_proj, use_bias=False), b, c

    def _split_dbc(self, dbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_proj's output [T, R + 2N] -> (Δ [T, R], B [T, N], C [T, N]), normalised where the model has it."""
        cfg = self.cfg
        return self.norm_dt_b_c(*dbc.split([cfg.dt_rank, cfg.state_size, cfg.state_size], dim=-1))

    def _project(
        self,
        x: torch.Tensor,
        linear: nn.Module,
        *,
        use_bias: bool = True,
        out: torch.Tensor | None = None,
        accumulate: bool = False,
        norm_weight: torch.Tensor | None = None,
        eps: float = 0.0,
    ) -> torch.Tensor:
        """A prefill projection x [T, K] -> [T, N]: ``linear(rms_norm(x, norm_weight, eps))`` (no norm
        without norm_weight), returned, or written to out (added to it with accumulate). Through
        ``prefill_linear`` where it runs (an nn.Linear it takes), else torch: the same maths."""
        bias = linear.bias if use_bias else None
        if self.prefill_linear is not None and isinstance(linear, nn.Linear):
            y = self.prefill_linear(
                x, linear.weight, bias, out=out, accumulate=accumulate, norm_weight=norm_weight, eps=eps
            )
            if y is not None:
                return y
        if norm_weight is not None:
            x = rms_norm(x.to(norm_weight.dtype), norm_weight, eps)
        y = linear(x) if use_bias else F.linear(x, linear.weight)
        if out is None:
            return y
        return out.add_(y) if accumulate else out.copy_(y)

    def norm_dt_b_c(
        self, delta: torch.Tensor, b: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hook on x_proj's outputs δ [T, R], B [T, N], C [T, N] before dt_proj and the scan: Mamba-1
        uses them as they are; Jamba's mixer RMS-normalises each (so δ must stay apart from dt_proj)."""
        return delta, b, c

    def prefill(
        self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, batch: PrefillBatch
    ) -> torch.Tensor:
        """h [T, D] packed normalised hidden states -> [T, D]; states updated in place by slot."""
        y = self._prefill_y(self._project(h, self.in_proj), conv_state, ssm_state, batch)
        return self._project(y, self.out_proj)

    def prefill_residual(
        self,
        h: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        conv_state: torch.Tensor,
        ssm_state: torch.Tensor,
        batch: PrefillBatch,
    ) -> None:
        """The block's residual update in place: h [T, D] += prefill(rms_norm(h, norm_weight, eps)).
        Where the prefill GEMM runs, the norm is applied as in_proj reads h and out_proj adds into h:
        no normalised copy of h, no [T, D] output, no separate add pass."""
        xz = self._project(h, self.in_proj, norm_weight=norm_weight, eps=eps)  # [T, 2E]
        y = self._prefill_y(xz, conv_state, ssm_state, batch)
        self._project(y, self.out_proj, out=h, accumulate=True)

    def _prefill_y(
        self, xz: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, batch: PrefillBatch
    ) -> torch.Tensor:
        """in_proj's output xz [T, 2E] -> the gated scan output y [T, E] (conv, x_proj, dt_proj, scan)."""
        x, z = xz.chunk(2, dim=-1)  # [T, E] each
        x = self.conv_chunk(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv_state, batch.varlen, batch.slot_ids, "silu"
        )
        dt, b, c = self._x_dbl_prefill(x)
        return self.scan_chunk(
            x, dt, self.A, b, c, self.D_f, z, self.dt_bias_f, ssm_state, batch.varlen, batch.slot_ids, True
        )

    def decode(
        self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, slot_ids: torch.Tensor
    ) -> torch.Tensor:
        """h [B, D], one token per sequence -> [B, D]; states updated in place by slot."""
        x, z = self.in_proj(h).chunk(2, dim=-1)  # [B, E] each
        x = self.conv_step(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, slot_ids, "silu")
        dt, b, c = self._x_dbl(x)
        y = self.scan_step(ssm_state, x, dt, self.A, b, c, self.D_f, z, self.dt_bias_f, slot_ids, True)
        return self.out_proj(y)

    def mixed(
        self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, batch: MixedBatch
    ) -> torch.Tensor:
        """h [n + T, D]: n decode rows, then T prompt tokens -> [n + T, D]. The projections take all
        rows at once (each weight read once per step); the conv and the scan run their step kernel on
        the decode rows and their chunk kernel on the prompt rows."""
        n, dec, pre = batch.num_decodes, batch.decode, batch.prefill
        w, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        x, z = self.in_proj(h).chunk(2, dim=-1)  # [n + T, E] each
        x = torch.cat(
            [
                self.conv_step(x[:n], conv_state, w, bias, dec.slot_ids, "silu"),
                self.conv_chunk(x[n:], w, bias, conv_state, pre.varlen, pre.slot_ids, "silu"),
            ]
        )
        dt, b, c = self._x_dbl(x)
        A, D, dt_bias = self.A, self.D_f, self.dt_bias_f
        y = torch.cat(
            [
                self.scan_step(ssm_state, x[:n], dt[:n], A, b[:n], c[:n], D, z[:n], dt_bias, dec.slot_ids, True),
                self.scan_chunk(
                    x[n:], dt[n:], A, b[n:], c[n:], D, z[n:], dt_bias, ssm_state, pre.varlen, pre.slot_ids, True
                ),
            ]
        )
        return self.out_proj(y)


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig, backend: Backend) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = MambaMixer(cfg, backend)


class MambaBackbone(nn.Module):
    def __init__(self, cfg: MambaConfig, backend: Backend) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([MambaBlock(cfg, backend) for _ in range(cfg.num_layers)])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class MambaLM(RecurrentLM):
    """Mamba-1 causal LM; module names follow transformers (``backbone.*``, ``lm_head``)."""

    def __init__(self, cfg: MambaConfig, backend: Backend = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.max_model_len = None
        self.backbone = MambaBackbone(cfg, backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> MambaLM:
        return cls(MambaConfig.from_hf(config), backend)

    def state_specs(self) -> list[list[StateSpec]]:
        cfg = self.cfg
        conv = StateSpec("conv", (cfg.intermediate_size, cfg.conv_kernel - 1), self.dtype)
        ssm = StateSpec("ssm", (cfg.intermediate_size, cfg.state_size), torch.float32)
        return [[conv, ssm] for _ in range(cfg.num_layers)]

    # ------------------------------------------------------------------ loading

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for layer in self.backbone.layers:
            layer.mixer.keep_fp32_params()
        mapper = WeightsMapper(
            # Original mamba_ssm checkpoints say ``backbone.embedding``; transformers says ``embeddings``.
            prefixes=(("backbone.embedding.", "backbone.embeddings."),),
            # Tied: the embedding is the head (mamba_ssm files store both).
            ignore_suffixes=("lm_head.weight",) if self.cfg.tie_word_embeddings else (),
        )
        return load_weights(self, weights, mapper)

    def post_load(self) -> None:
        if self.device.type == "cpu":
            for layer in self.backbone.layers:
                mixer: MambaMixer = layer.mixer
                for linear in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj):
                    use_column_major_weight(linear)
            if not self.cfg.tie_word_embeddings:
                use_column_major_weight(self.lm_head)

    def quantize_int8(self) -> None:
        """int8 in_proj, out_proj and head (96% of the weight bytes). x_proj and dt_proj, which make
        the step size Δ, and the embedding lookup stay fp32."""
        for layer in self.backbone.layers:
            layer.mixer.in_proj = quantize_int8(layer.mixer.in_proj)
            layer.mixer.out_proj = quantize_int8(layer.mixer.out_proj)
        self.lm_head = quantize_int8(self.lm_head)  # a tied embedding keeps its fp32 weight for lookups

    # ------------------------------------------------------------------ forward

    def _residual_dtype(self) -> torch.dtype:
        return torch.float32 if self.cfg.residual_in_fp32 else self.dtype

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return lm_logits(rms_norm(h, self.backbone.norm_f.weight, self.cfg.norm_eps), self.lm_head)

    @torch.no_grad()
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [T, D]
        for layer, st in zip(self.backbone.layers, states):
            layer.mixer.prefill_residual(h, layer.norm.weight, self.cfg.norm_eps, st["conv"], st["ssm"], batch)
        return self._logits(h.index_select(0, batch.logits_indices))

    @torch.no_grad()
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [B, D]
        for layer, st in zip(self.backbone.layers, states):
            normed = rms_norm(h.to(self.dtype), layer.norm.weight, self.cfg.norm_eps)
            h.add_(layer.mixer.decode(normed, st["conv"], st["ssm"], batch.slot_ids))
        return self._logits(h)

    @torch.no_grad()
    def mixed(self, batch: MixedBatch, states: States) -> torch.Tensor:
        """One pass for decodes and prompt chunks together (see ``MambaMixer.mixed``)."""
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [n + T, D]
        for layer, st in zip(self.backbone.layers, states):
            normed = rms_norm(h.to(self.dtype), layer.norm.weight, self.cfg.norm_eps)
            h.add_(layer.mixer.mixed(normed, st["conv"], st["ssm"], batch))
        return self._logits(h.index_select(0, batch.logits_indices))
