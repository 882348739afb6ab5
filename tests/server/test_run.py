"""rnnserve.server.run: what ``run`` does before it serves."""

from __future__ import annotations

import gc
import sys
from types import SimpleNamespace

import pytest

from rnnserve.config import ServerConfig
from rnnserve.server import run as run_module
from rnnserve.server.admission import unbounded


def test_run_freezes_the_startup_heap_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    # Objects alive when serving starts (the model, torch, the tokenizer) must sit in the permanent
    # generation, or every full collection during a burst walks all of them with the GIL held.
    frozen_when_serving: list[int] = []
    served: list[object] = []

    def fake_run(self: run_module.DrainingServer, sockets: object = None) -> None:
        frozen_when_serving.append(gc.get_freeze_count())
        served.append(self.config.app)
        assert self.config.http.edge is self.config.app  # the protocol refuses for that EdgeGuard
        assert self.config.proxy_headers is False  # a client is its peer address, never X-Forwarded-For

    monkeypatch.setattr(run_module.DrainingServer, "run", fake_run)
    gc.unfreeze()  # nothing frozen before: what is frozen when serving starts, run() froze
    edge = object()
    try:
        # What run() reads of build_app's FastAPI app: admission, and the EdgeGuard uvicorn serves.
        app = SimpleNamespace(state=SimpleNamespace(admission=unbounded(), edge=edge))
        run_module.run(app, ServerConfig())  # type: ignore[arg-type]
        frozen_after = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert len(frozen_when_serving) == 1
    assert frozen_when_serving[0] > 0
    assert served == [edge]
    # Unfrozen once serving ends, so the interpreter's shutdown frees the heap (tests/reliability/
    # test_drain.py checks a real server's exit prints no binding's leak report).
    assert frozen_after == 0


def test_run_unfreezes_when_serving_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(self: run_module.DrainingServer, sockets: object = None) -> None:
        raise OSError("address in use")

    monkeypatch.setattr(run_module.DrainingServer, "run", failing_run)
    app = SimpleNamespace(state=SimpleNamespace(admission=unbounded(), edge=object()))
    try:
        with pytest.raises(OSError, match="address in use"):
            run_module.run(app, ServerConfig())  # type: ignore[arg-type]
        frozen_after = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert frozen_after == 0


def test_run_shortens_the_gil_switch_interval_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine thread and the event loop share the GIL: at CPython's 5 ms default, a step's torch
    # ops each wait up to 5 ms for it while the loop is busy with a burst.
    interval_when_serving: list[float] = []
    monkeypatch.setattr(
        run_module.DrainingServer,
        "run",
        lambda self, sockets=None: interval_when_serving.append(sys.getswitchinterval()),
    )
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        app = SimpleNamespace(state=SimpleNamespace(admission=unbounded(), edge=object()))
        run_module.run(app, ServerConfig())  # type: ignore[arg-type]
    finally:
        sys.setswitchinterval(before)
        gc.unfreeze()
    assert interval_when_serving == [pytest.approx(run_module.GIL_SWITCH_INTERVAL_S)]
    assert run_module.GIL_SWITCH_INTERVAL_S < 0.005
