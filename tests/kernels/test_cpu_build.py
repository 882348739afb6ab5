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


def test_each_checkout_has_its_own_build(tmp_path: Path) -> None:
    """torch keys a cached build by name alone: two checkouts' copies of a source get two names, so a
    clone elsewhere (a CI run) does not rebuild over this checkout's build."""
    here = scan_cpu._EXTENSION.source
    other = tmp_path / "clone" / here.name
    assert cpu_decode.build_name("x", here) != cpu_decode.build_name("x", other)
    assert cpu_decode.build_name("x", here) == cpu_decode.build_name(
        "x", here.parent / ".." / here.parent.name / here.name
    )
    assert cpu_decode.build_name("x", here).startswith("x_")


def test_a_lock_left_by_a_dead_build_is_removed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A server stopped while it built in the background leaves torch's lock file, on which every later
    build would wait forever; an old one is removed, a recent one (a build under way) is not."""
    import os
    import time

    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, recent = (Path(_get_build_directory(n, False)) / "lock" for n in ("old_build", "recent_build"))
    for lock in (old, recent):
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    stale = time.time() - cpu_decode.STALE_LOCK_S - 60
    os.utime(old, (stale, stale))
    cpu_decode._remove_stale_lock(old)
    cpu_decode._remove_stale_lock(recent)
    assert not old.exists() and recent.exists()


_EXIT_DURING_BUILD = """
import sys, threading, time
from pathlib import Path
import torch.utils.cpp_extension as ext
from rnnserve.kernels import cpu_decode

def fake_build(name, **kwargs):  # takes torch's lock as torch does, then compiles "forever"
    lock = Path(ext._get_build_directory(name, False)) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    threading.Event().wait()

ext.load = fake_build
src = Path(sys.argv[1])
threading.Thread(target=cpu_decode.build_extension, args=("exit_build", src, [], "none", "test"), daemon=True).start()
lock = Path(ext._get_build_directory(cpu_decode.build_name("exit_build", src), False)) / "lock"
while not lock.exists():
    time.sleep(0.01)
print(lock)
"""


def test_a_process_that_exits_while_building_leaves_no_lock(tmp_path: Path) -> None:
    """A server stopped (Ctrl-C) while it built in the background: its build thread never unwinds, so
    torch's own release does not run; the lock must go at exit, or the next server's build waits on it."""
    import os
    import subprocess
    import sys

    if cpu_decode.unavailable_reason() is not None:
        pytest.skip(cpu_decode.unavailable_reason())
    source = tmp_path / "x.cpp"
    source.write_text("// nothing\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    run = subprocess.run(
        [sys.executable, "-c", _EXIT_DURING_BUILD, str(source)], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    lock = Path(run.stdout.strip())
    assert lock.name == "lock" and lock.parent.is_dir() and not lock.exists()
