"""``--cpu-decode auto``, the server's default: the fused C++ decode step (``engine/cpu_decode.py``) where
the model and machine allow it (the CPU, a family with a fused step, float32 or int8 weights, AVX2), the
torch path otherwise, with one log line saying which and why.

The fused kernels compile for 1-3 minutes where torch's extension cache holds no current build (a fresh
``make serve``; ``make install`` builds them), and packing the weights takes a moment even with one, so
start-up never waits for them: ``SwitchingDecoder`` decodes with the torch path while a background thread
loads or builds the kernels and packs the weights, then decodes with the fused step from the next call
on. Each call is one engine step, so the switch falls between two steps; both paths read and update the
same state pools in place, so a sequence decoded across the switch continues from the same state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from rnnserve.engine.cpu_decode import fused_decoder, unsupported_reason
from rnnserve.kernels import cpu_decode
from rnnserve.models.base import DecodeBatch, RecurrentLM, States
from rnnserve.models.layers import Int8Linear

logger = logging.getLogger(__name__)

Decoder = Callable[[DecodeBatch], torch.Tensor]


class SwitchingDecoder:
    """Decodes with ``fallback`` until ``prepare``, run once on a background thread, returns the fused
    decoder; the first call after that and every later one use it. A None from ``prepare`` (the kernels
    did not build; the reason is logged there) or an exception keeps the torch path for good."""

    def __init__(self, fallback: Decoder, prepare: Callable[[], Decoder | None]) -> None:
        self._decoder = fallback
        self._fused: Decoder | None = None  # written once by the background thread
        self._steps = 0  # calls made with the fallback, for the log line of the switch
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._prepare, args=(prepare,), name="prepare-fused-decode", daemon=True)
        self._thread.start()

    def _prepare(self, prepare: Callable[[], Decoder | None]) -> None:
        try:
            self._fused = prepare()
        except Exception:  # a failure of the fused path must not stop the torch path from serving
            logger.exception("--cpu-decode auto: preparing the fused decode failed; decoding with the torch path")
        finally:
            self._done.set()

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        fused = self._fused
        if fused is not None and self._decoder is not fused:
            self._decoder = fused
            logger.info("--cpu-decode auto: the fused C++ decode takes over after %d torch-path steps", self._steps)
        elif self._decoder is not fused:
            self._steps += 1
        return self._decoder(batch)

    @property
    def fused(self) -> bool:
        """Whether the calls now go to the fused decoder."""
        return self._fused is not None and self._decoder is self._fused

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background preparation to end (True when it has); the switch itself happens at
        the next call."""
        return self._done.wait(timeout)


def auto_decoder(model: RecurrentLM, states: States, fallback: Decoder) -> Decoder:
    """``fallback`` (the torch path) where the fused decode cannot serve ``model``, else a
    ``SwitchingDecoder`` from ``fallback`` to the fused decode; logs which and why."""
    reason = unsupported_reason(model, states)
    if reason is None and model.device.type != "cpu":
        reason = f"the fused decode runs on the CPU (model on {model.device.type})"
    if reason is None:
        reason = cpu_decode.unavailable_reason()
    if reason is not None:
        logger.info("--cpu-decode auto: decoding with the torch path: %s", reason)
        return fallback
    logger.info(
        "--cpu-decode auto: decoding %s with the fused C++ decode (a supported family, %s on the CPU); its kernels "
        "load or build and the weights are packed on a background thread, the torch path decodes until then",
        type(model).__name__,
        "int8" if _has_int8(model) else "float32",
    )
    return SwitchingDecoder(fallback, lambda: fused_decoder(model, states))


def _has_int8(model: RecurrentLM) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
