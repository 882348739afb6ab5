"""CPU fast path: the decode step compiled by ``torch.compile`` (Inductor's C++/OpenMP backend).

Eager decode of a recurrent model runs ~20-40 small ops per layer (projections split, conv shift,
softplus, exp, state update, gating); Inductor fuses the elementwise chains into a few C++ loops and
leaves the matrix products to oneDNN/MKL. What is compiled:

- the *decode units*: the outermost submodules whose class defines a ``decode`` method (Mamba's and
  Mamba-2's mixers). Every layer runs the same code on same-shaped parameters, and Dynamo lifts
  parameters to graph inputs, so one compilation serves all layers: seconds instead of the minutes a
  whole 24-layer unrolled graph takes;
- failing that (families whose layers have no ``decode``), the model's whole ``decode``.

The batch dimension is compiled dynamic, so one graph (plus Dynamo's batch-1 specialisation) serves
every batch size. The compilation happens in ``warmup()`` at start-up on the padding slot 0, timed and
logged; Inductor's on-disk cache makes later start-ups faster.
"""

from __future__ import annotations

import logging
import time
import types

import torch
from torch import nn

from rnnserve.models.base import PAD_SLOT, DecodeBatch, RecurrentLM, States

logger = logging.getLogger(__name__)


def decode_units(model: RecurrentLM) -> list[nn.Module]:
    """The outermost proper submodules whose class defines ``decode`` (in module order)."""
    units: list[nn.Module] = []
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if module is model or any(name.startswith(p + ".") for p in prefixes):
            continue
        if callable(getattr(type(module), "decode", None)):
            units.append(module)
            prefixes.append(name)
    return units


class CompiledDecoder:
    """Callable ``(DecodeBatch) -> logits [B, V]`` running the model's decode through torch.compile.

    Compiling replaces each decode unit's ``decode`` with a compiled wrapper on that instance (the
    class is untouched); ``restore()`` puts the eager methods back.
    """

    def __init__(
        self, model: RecurrentLM, states: States, *, mode: str | None = None, backend: str = "inductor"
    ) -> None:
        self.model = model
        self.states = states
        self.units = decode_units(model)
        self.compile_s: float | None = None
        if self.units:
            for unit in self.units:
                # From the class's method, not ``unit.decode``: a decoder built earlier on the same model
                # (one engine per benchmark batch size) may have left its compiled wrapper there.
                eager = types.MethodType(type(unit).decode, unit)
                unit.decode = torch.compile(eager, dynamic=True, mode=mode, backend=backend)  # type: ignore[method-assign]
            self._decode = model.decode
        else:
            self._decode = torch.compile(model.decode, dynamic=True, mode=mode, backend=backend)

    def restore(self) -> None:
        """Put the eager ``decode`` methods back on the decode units."""
        for unit in self.units:
            if "decode" in vars(unit):
                del unit.decode

    @torch.inference_mode()
    def warmup(self, batch_sizes: tuple[int, ...] = (1, 2)) -> float:
        """Compile for batch 1 and the dynamic batch on slot 0; log and return the seconds it took."""
        device = self.model.device
        t0 = time.perf_counter()
        for b in batch_sizes:
            pad = torch.full((b,), PAD_SLOT, dtype=torch.long, device=device)  # ids, positions, slots: all 0
            self._decode(DecodeBatch(pad, pad, pad), self.states)
        self.compile_s = time.perf_counter() - t0
        logger.info(
            "compiled CPU decode (%s) in %.1f s",
            f"{len(self.units)} decode units" if self.units else "whole model",
            self.compile_s,
        )
        return self.compile_s

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        return self._decode(batch, self.states)
