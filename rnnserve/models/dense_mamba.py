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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.base import DecodeBatch, PrefillBatch, States
from rnnserve.models.layers import RMSNorm, rms_norm
from rnnserve.models.mamba import MambaConfig, MambaLM, MambaMixer

# (mixer, normalised input [N, D], layer index) -> (SSM output before the gate [N, E], z [N, E])
SsmStep = Callable[[MambaMixer, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class SelectGate(nn.Module):
    """The selective transition's gate MLP, fc2(silu(fc1(x̂))): D -> D/32 -> E (as DenseRetNet's release)."""

    def __init__(self, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size // 32, bias=False)
        self.fc2 = nn.Linear(hidden_size // 32, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def _ssm_prefill(
    mixer: MambaMixer, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, batch: PrefillBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's mixer up to the SSM output, without the gate: h [T, D] -> y [T, E], z [T, E]."""
    x, z = mixer.in_proj(h).chunk(2, dim=-1)
    x = mixer.conv_chunk(
        x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, conv_state, batch.cu_seqlens, batch.slot_ids, "silu"
    )
    dt, b, c = mixer._x_dbl(x)
    y = mixer.scan_chunk(
        x, dt, mixer.A, b, c, mixer.D_f, None, mixer.dt_bias_f, ssm_state, batch.cu_seqlens, batch.slot_ids, True
    )
    return y, z


def _ssm_decode(
    mixer: MambaMixer, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, slot_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence: h [B, D] -> y [B, E], z [B, E]; states updated in place by slot."""
    x, z = mixer.in_proj(h).chunk(2, dim=-1)
    x = mixer.conv_step(x, conv_state, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, slot_ids, "silu")
    dt, b, c = mixer._x_dbl(x)
    y = mixer.scan_step(ssm_state, x, dt, mixer.A, b, c, mixer.D_f, None, mixer.dt_bias_f, slot_ids, True)
    return y, z


class DenseMambaLM(MambaLM):
    """Mamba-1 with dense hidden connections; registered as ``DenseMambaForCausalLM`` / ``dense_mamba``."""

    def __init__(self, cfg: MambaConfig, dense_block_layers: int = 1, backend: Backend = "torch") -> None:
        super().__init__(cfg, backend)
        if dense_block_layers < 0:
            raise ValueError("dense_block_layers must be >= 0")
        if dense_block_layers and cfg.hidden_size < 32:
            raise ValueError("dense fusion needs hidden_size >= 32 (its gate MLP goes through hidden_size/32)")
        self.dense_block_layers = dense_block_layers
        if dense_block_layers:
            # The fusion modules live on the mixers of layers 1.. (layer 0 has nothing to fuse).
            for layer in list(self.backbone.layers)[1:]:
                layer.mixer.y_select = SelectGate(cfg.hidden_size, cfg.intermediate_size)
                layer.mixer.y_norm = RMSNorm(cfg.intermediate_size, cfg.norm_eps)

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> DenseMambaLM:
        return cls(MambaConfig.from_hf(config), config.get("dense_block_layers", 1), backend)

    def _fuse(
        self, i: int, mixer: MambaMixer, normed: torch.Tensor, y: torch.Tensor, past: list[torch.Tensor]
    ) -> torch.Tensor:
        """Layer i's SSM output after the dense connection over ``past`` (earlier layers' y, same tokens)."""
        if not self.dense_block_layers or i == 0:
            return y
        g = F.silu(mixer.y_select(normed))  # [N, E]
        for y_past in past:
            y = y + g * y_past
        return mixer.y_norm(y)

    def _layers(self, h: torch.Tensor, step: SsmStep) -> torch.Tensor:
        """Run every layer over h [N, D] (residual dtype), the SSM part of each by ``step``."""
        m = self.dense_block_layers
        past: list[torch.Tensor] = []  # pre-fusion y [N, E] of the last m layers, same tokens
        for i, layer in enumerate(self.backbone.layers):
            mixer: MambaMixer = layer.mixer
            normed = rms_norm(h.to(self.dtype), layer.norm.weight, self.cfg.norm_eps)
            y_raw, z = step(mixer, normed, i)
            y = self._fuse(i, mixer, normed, y_raw, past)
            h = h + mixer.out_proj(y * F.silu(z))
            if m:
                past = [*past, y_raw][-m:]
        return h

    @torch.no_grad()
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [T, D]
        h = self._layers(h, lambda mixer, x, i: _ssm_prefill(mixer, x, states[i]["conv"], states[i]["ssm"], batch))
        return self._logits(h.index_select(0, batch.logits_indices))

    @torch.no_grad()
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        h = self.backbone.embeddings(batch.input_ids).to(self._residual_dtype())  # [B, D]
        h = self._layers(
            h, lambda mixer, x, i: _ssm_decode(mixer, x, states[i]["conv"], states[i]["ssm"], batch.slot_ids)
        )
        return self._logits(h)
