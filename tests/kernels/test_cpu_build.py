"""kernels.cpu_build.LazyExtension: a cached build loads on the first call; without one the build runs on
a background thread and ``ready()`` says None (the torch path) until it has loaded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from rnnserve.kernels import cpu_build, cpu_decode


def _fake_build(monkeypatch: pytest.MonkeyPatch, gate: threading.Event | None = None) -> list[str]:
    calls: list[str] = []

    def build(name: str, source: Path, cflags: list[str], namespace: str, what: str) -> str:
        if gate is not None:
            assert gate.wait(10)
        calls.append(name)
        return f"ops:{namespace}"

    monkeypatch.setattr(cpu_decode, "build_extension", build)
    return calls


def test_cached_build_loads_on_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_build(monkeypatch)
    ext = cpu_build.LazyExtension("x", Path("x.cpp"), [], "ns", "test kernel")
    monkeypatch.setattr(ext, "_cached", lambda: True)
    assert ext.ready() == "ops:ns" and ext.ready() == "ops:ns" and ext.load() == "ops:ns"
    assert calls == ["x"]


def test_without_a_build_it_builds_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    calls = _fake_build(monkeypatch, gate)
    ext = cpu_build.LazyExtension("y", Path("y.cpp"), [], "ns", "test kernel")
    monkeypatch.setattr(ext, "_cached", lambda: False)
    assert ext.ready() is None  # started, not waited for
    assert ext.ready() is None and calls == []
    gate.set()
    assert ext._thread is not None
    ext._thread.join(10)
    assert ext.ready() == "ops:ns" and calls == ["y"]
