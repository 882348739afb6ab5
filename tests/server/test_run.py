"""rnnserve.server.run: what ``run`` does before it serves."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest

from rnnserve.config import ServerConfig
from rnnserve.server import run as run_module
from rnnserve.server.admission import unbounded


def test_run_freezes_the_startup_heap_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    # Objects alive when serving starts (the model, torch, the tokenizer) must sit in the permanent
    # generation, or every full collection during a burst walks all of them with the GIL held.
    frozen_when_serving: list[int] = []
    monkeypatch.setattr(
        run_module.DrainingServer, "run", lambda self, sockets=None: frozen_when_serving.append(gc.get_freeze_count())
    )
    gc.unfreeze()  # nothing frozen before: what is frozen when serving starts, run() froze
    try:
        app = SimpleNamespace(state=SimpleNamespace(admission=unbounded()))  # what run() reads of a FastAPI app
        run_module.run(app, ServerConfig())  # type: ignore[arg-type]
    finally:
        gc.unfreeze()
    assert len(frozen_when_serving) == 1
    assert frozen_when_serving[0] > 0
