"""kernels.cpu_build.LazyExtension: a current cached build loads on the first call; without one, or with
a stale one, the build runs on a background thread and ``ready()`` says None (the torch path) until it
has loaded. ``cpu_decode.build_is_current`` tells a current build from a stale one."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from rnnserve.kernels import cpu_build, cpu_decode
from rnnserve.kernels.selective_scan import cpu as scan_cpu


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
    monkeypatch.setattr(ext, "_current", lambda: True)
    assert ext.ready() == "ops:ns" and ext.ready() == "ops:ns" and ext.load() == "ops:ns"
    assert calls == ["x"]


def test_without_a_build_it_builds_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    calls = _fake_build(monkeypatch, gate)
    ext = cpu_build.LazyExtension("y", Path("y.cpp"), [], "ns", "test kernel")
    monkeypatch.setattr(ext, "_current", lambda: False)
    assert ext.ready() is None  # started, not waited for
    assert ext.ready() is None and calls == []
    gate.set()
    assert ext._thread is not None
    ext._thread.join(10)
    assert ext.ready() == "ops:ns" and calls == ["y"]


def test_a_stale_build_is_not_current(tmp_path: Path) -> None:
    """The prefill scan's build in torch's extension cache (``make install`` made it; loading it here
    compiles only where it is missing or stale): current for its own source and flags; stale for the
    same name built from another checkout's copy of the source or with another flag, which ``load``
    would rebuild (so ``ready`` must build those in the background, not on the caller's thread)."""
    ext = scan_cpu._EXTENSION
    if cpu_decode.unavailable_reason() is not None or ext.load() is None:
        pytest.skip("the prefill scan kernel cannot be built here")
    assert cpu_decode.build_is_current(ext.name, ext.source, ext.cflags)
    assert ext._current()
    assert not cpu_decode.build_is_current(ext.name, ext.source, [*ext.cflags, "-DRNNSERVE_OTHER_FLAG"])
    other = tmp_path / "checkout" / ext.source.name
    other.parent.mkdir()
    shutil.copy(ext.source, other)
    assert not cpu_decode.build_is_current(ext.name, other, ext.cflags)
    assert not cpu_decode.build_is_current("rnnserve_never_built", ext.source, ext.cflags)


def test_a_stale_build_is_built_in_the_background(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A cache entry that exists but is not current goes to the background thread like a missing one."""
    gate = threading.Event()
    calls = _fake_build(monkeypatch, gate)
    monkeypatch.setattr(cpu_decode, "build_is_current", lambda name, source, cflags: False)
    ext = cpu_build.LazyExtension("z", tmp_path / "z.cpp", [], "ns", "test kernel")
    assert ext.ready() is None and calls == []
    gate.set()
    assert ext._thread is not None
    ext._thread.join(10)
    assert ext.ready() == "ops:ns" and calls == ["z"]
