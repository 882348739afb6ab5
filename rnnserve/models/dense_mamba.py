"""DenseMamba (DenseSSM, arXiv 2403.00818): Mamba-1 whose layers fuse the SSM outputs of the
``m = dense_block_layers`` previous layers for the same token, before the output gate.

No code or weights were released for DenseMamba; models/README.md states the reading implemented here.
Per layer l (D hidden, E inner), with x̂ = RMSNorm(h) and the Mamba mixer of ``models/mamba.py``:

    x, z = in_proj(x̂);  x = silu(conv(x));  y_l = selective_scan(x) + D ⊙ x      # [E], before the gate
    if l >= 1 and m >= 1:                                                      # dense hidden connection
        g   = silu(y_select(x̂))                     # selective transition gate, D -> D/32 -> E
        y   = y_norm(y_l + Σ_{j=1..min(l,m)} g ⊙ y_{l-j})   # hidden fusion: add, then RMSNorm [E]
    else:
        y   = y_l
    h += out_proj(y ⊙ silu(z))

``y_{l-j}`` are the earlier layers' pre-fusion SSM outputs for the same token: transient within one
forward, so the state per layer stays Mamba's (``conv [E, K-1]``, ``ssm [E, N]`` fp32). With m = 0 the
model is exactly Mamba. Checkpoint layout: transformers' Mamba names plus, on layers l >= 1,
``backbone.layers.{l}.mixer.y_select.fc1.weight [D/32, D]``, ``y_select.fc2.weight [E, D/32]`` and
``y_norm.weight [E]``; config.json is a ``MambaConfig`` with ``"architectures": ["DenseMambaForCausalLM"]``,
``"model_type": "dense_mamba"`` and ``"dense_block_layers": m``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.base import DecodeBatch, PrefillBatch, RecurrentLM, States
from rnnserve.models.layers import DenseSelect, RMSNorm, rms_norm
from rnnserve.models.mamba import MambaBlock, MambaConfig, MambaLM, MambaMixer


class DenseMambaBlock(nn.Module):
    """One Mamba block (its own ``norm`` and ``mixer``, so parameter names stay Mamba's) with the dense
    fusion. Its ``prefill`` / ``decode`` run the whole layer; ``decode`` is the unit the engine's CPU
    fast path compiles."""

    def __init__(self, block: MambaBlock, cfg: MambaConfig, fuse: bool) -> None:
        super().__init__()
        self.norm = block.norm
        self.mixer: MambaMixer = block.mixer
        self.eps = cfg.norm_eps
        self.fuse = fuse
        if fuse:
            self.mixer.y_select = DenseSelect(cfg.hidden_size, cfg.intermediate_size)
            self.mixer.y_norm = RMSNorm(cfg.intermediate_size, cfg.norm_eps)

    def _finish(
        self, h: torch.Tensor, normed: torch.Tensor, y: torch.Tensor, z: torch.Tensor, past: list[torch.Tensor]
    ) -> torch.Tensor:
        """Dense fusion of y [N, E] with the earlier layers' ``past`` outputs, gate, out_proj, residual."""
        if self.fuse:
            g = F.silu(self.mixer.y_select(normed))  # [N, E]
            for y_past in past:
                y = y + g * y_past
            y = self.mixer.y_norm(y)
        return h + self.mixer.out_proj(y * F.silu(z))

    def prefill(
        self,
        h: torch.Tensor,
        conv_state: torch.Tensor,
        ssm_state: torch.Tensor,
        batch: PrefillBatch,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, D] (residual dtype) -> (new h, this layer's pre-fusion SSM output y [T, E])."""
        mixer = self.mixer
        normed = rms_norm(h.to(self.norm.weight.dtype), self.norm.weight, self.eps)
        x, z = mixer.in_proj(normed).chunk(2, dim=-1)  # [T, E] each
        x = mixer.conv_chunk(
            x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, conv_state, batch.varlen, batch.slot_ids, "silu"
        )
        dt, b, c = mixer._x_dbl(x)
        # z = None: the scan returns y = s·C + D⊙x without the gate, which comes after the fusion.
        y = mixer.scan_chunk(
            x, dt, mixer.A, b, c, mixer.D_f, None, mixer.dt_bias_f, ssm_state, batch.varlen, batch.slot_ids, True
        )
        return self._finish(h, normed, y, z, past), y

    def decode(
        self,
        h: torch.Tensor,
        conv_state: torch.Tensor,
        ssm_state: torch.Tensor,
        slot_ids: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per sequence: h [B, D] -> (new h, pre-fusion y [B, E]); states updated in place."""
        mixer = self.mixer
        normed = rms_norm(h.to(self.norm.weight.dtype), self.norm.weight, self.eps)
        x, z = mixer.in_proj(normed).chunk(2, dim=-1)  # [B, E] each
        x = mixer.conv_step(x, conv_state, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, slot_ids, "silu")
        dt, b, c = mixer._x_dbl(x)
        y = mixer.scan_step(ssm_state, x, dt, mixer.A, b, c, mixer.D_f, None, mixer.dt_bias_f, slot_ids, True)
        return self._finish(h, normed, y, z, past), y


class DenseMambaLM(MambaLM):
    """Mamba-1 with dense hidden connections; registered as ``DenseMambaForCausalLM`` / ``dense_mamba``."""

    def __init__(self, cfg: MambaConfig, dense_block_layers: int = 1, backend: Backend = "torch") -> None:
        super().__init__(cfg, backend)
        if dense_block_layers < 0:
            raise ValueError("dense_block_layers must be >= 0")
        if dense_block_layers and cfg.hidden_size < 32:
            raise ValueError("dense fusion needs hidden_size >= 32 (its gate MLP goes through hidden_size/32)")
        self.dense_block_layers = dense_block_layers
        # Wrap Mamba's blocks (same modules, same names); the fusion weights live on the mixers of
        # layers 1.. (layer 0 has nothing to fuse).
        self.backbone.layers = nn.ModuleList(
            DenseMambaBlock(block, cfg, fuse=dense_block_layers > 0 and i > 0)
            for i, block in enumerate(self.backbone.layers)
        )

    # Not Mamba's: a dense layer also mixes in earlier layers' outputs, which Mamba's one-pass mixed
    # step does not know about, so the interface's default applies (two passes).
    mixed = RecurrentLM.mixed

    def quantize_int8(self) -> None:
        """Mamba's choice (int8 in_proj, out_proj and head; x_proj / dt_proj, which make Δ, stay fp32);
        the dense selection gates y_select (through D/32, ~2% of a layer's weights) and y_norm stay
        fp32 too."""
        super().quantize_int8()

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> DenseMambaLM:
        return cls(MambaConfig.from_hf(config), config.get("dense_block_layers", 1), backend)

    def _keep(self, past: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
        """The pre-fusion outputs of the last m layers (same tokens): transient, never state. Always m
        entries once layer 0 ran: missing earlier layers are zeros, which add exactly nothing, so every
        fusing layer runs the same code (one compiled graph for all of them)."""
        m = self.dense_block_layers
        if not m:
            return past
        if not past:
            past = [torch.zeros_like(y)] * m
        return [*past[1:], y]

    @torch.no_grad()
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [T, D]
        past: list[torch.Tensor] = []
        for layer, st in zip(self.backbone.layers, states):
            h, y = layer.prefill(h, st["conv"], st["ssm"], batch, past)
            past = self._keep(past, y)
        return self._logits(h.index_select(0, batch.logits_indices))

    @torch.no_grad()
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [B, D]
        past: list[torch.Tensor] = []
        for layer, st in zip(self.backbone.layers, states):
            h, y = layer.decode(h, st["conv"], st["ssm"], batch.slot_ids, past)
            past = self._keep(past, y)
        return self._logits(h)
