"""The fused CPU decode step (Mamba-1, Mamba-2; float32 activations and state, float32 or int8 weights
packed into 16-column panels; AVX2 + FMA; threads of its own): ``cpu_decode.cpp``, built on first use by
``torch.utils.cpp_extension`` (g++ and ninja) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``), so later start-ups only load it.

``load()`` returns the op namespace ``torch.ops.rnnserve_cpu`` or None with the reason logged once (no
AVX2, no compiler, a failed build): callers fall back to the torch path.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_decode.cpp")
# The header every extension includes (packed panels, their kernels, the item pool, AVX2 math).
HEADERS = (Path(__file__).with_name("panels.h"),)


def unavailable_reason() -> str | None:
    """Why the extension cannot run on this machine (None when it can)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2/FMA (torch reports {capability})"
    return None


def header_flags(headers: tuple[Path, ...] = HEADERS) -> list[str]:
    """Compiler flags naming the headers' directories and their content hash. torch's loader hashes only
    the sources and flags to decide whether a cached build is current, so the hash in a define makes an
    edited header rebuild every extension that includes it."""
    digest = hashlib.sha256(b"".join(h.read_bytes() for h in headers)).hexdigest()[:16]
    return [f"-DRNNSERVE_HEADERS_SHA={digest}", *sorted({f"-I{h.parent}" for h in headers})]


def build_name(name: str, source: Path) -> str:
    """The name of ``source``'s build in torch's extension cache: ``name`` and a hash of the source's
    folder. torch keys a build by its name alone, so without the hash a checkout elsewhere (a CI clone,
    a second worktree) rebuilt the shared entry from its own path and left this one's stale: the next
    server here had to build again before its first fast prefill."""
    digest = hashlib.sha256(str(source.resolve().parent).encode()).hexdigest()[:8]
    return f"{name}_{digest}"


def build_is_current(name: str, source: Path, cflags: list[str]) -> bool:
    """Whether torch's extension cache holds a build of ``source`` that ``build_extension`` would load
    without compiling: ninja, asked for a dry run of the build file torch would write now, has no work
    to do. A build made from another checkout (another source path), with other flags or before an edit
    of the source or a header is not current. False too where this cannot be told (no ninja, a changed
    private helper of torch's): the caller then builds in the background, which for a current build is
    only a load."""
    try:
        from torch.utils import cpp_extension as ext

        name = build_name(name, source)
        build_dir = Path(ext._get_build_directory(name, False))
        ninja = shutil.which("ninja")
        if ninja is None or not (build_dir / f"{name}.so").is_file():
            return False
        with tempfile.TemporaryDirectory(prefix="rnnserve-build-check-") as tmp:
            build_file = Path(tmp) / "build.ninja"
            # The arguments torch.utils.cpp_extension.load passes for one C++ source, no CUDA.
            ldflags = ext._prepare_ldflags([], False, False, False, False)
            flags = cflags + header_flags()
            ext._write_ninja_file_to_build_library(
                build_file, name, [str(source)], flags, [], [], ldflags, [], False, False, False
            )
            # -n (dry run) neither compiles nor writes ninja's log in the build directory.
            run = subprocess.run(
                [ninja, "-C", str(build_dir), "-f", str(build_file), "-n"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        return run.returncode == 0 and "no work to do" in run.stdout
    except Exception:  # torch's private helpers moved, ninja failed: not known to be current
        logger.debug("could not check the cached build of %s", name, exc_info=True)
        return False


# A build takes 1-3 minutes; torch's lock file in a build folder older than this was left by a process
# that died while building (a server stopped while it built in the background), and torch would wait
# for it forever.
STALE_LOCK_S = 15 * 60


def _lock_path(name: str) -> Path | None:
    """torch's build lock file of extension ``name`` (None where torch's private helper moved)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, False)) / "lock"
    except Exception:  # a private helper of torch's moved: torch's own wait stands
        logger.debug("could not locate %s's build lock", name, exc_info=True)
        return None


def _remove_stale_lock(lock: Path) -> None:
    try:
        if lock.is_file() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            logger.warning("removing %s, left by a build that did not finish", lock)
            lock.unlink(missing_ok=True)
    except OSError:
        logger.debug("could not check %s", lock, exc_info=True)


def _remove_own_lock(lock: Path) -> None:
    """At exit during this process's own build (Ctrl-C while a server builds in the background, which
    interrupts the compiler too): without this the lock stays, and the next server's build waits on it
    until it is STALE_LOCK_S old."""
    lock.unlink(missing_ok=True)


def build_extension(name: str, source: Path, cflags: list[str], namespace: str, what: str) -> Any | None:
    """Build (first use) and load one C++ source registering ``torch.ops.<namespace>``; that namespace,
    or None with the reason logged (no AVX2, no compiler or ninja, a failed build). The source may
    include ``HEADERS`` (found through -I wherever the source lies; a changed header rebuilds)."""
    reason = unavailable_reason()
    if reason is None:
        t0 = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load as build

            flags = cflags + header_flags()
            lock = _lock_path(build_name(name, source))
            if lock is not None:
                _remove_stale_lock(lock)
            # A lock already there is another process's build (torch waits for it): only ours is removed
            # if this process exits before the build ends.
            release = functools.partial(_remove_own_lock, lock) if lock is not None and not lock.exists() else None
            if release is not None:
                atexit.register(release)
            try:
                build(
                    name=build_name(name, source),
                    sources=[str(source)],
                    extra_cflags=flags,
                    is_python_module=False,
                    verbose=False,
                )
            finally:
                if release is not None:
                    atexit.unregister(release)
            logger.info("%s loaded in %.1f s", what, time.perf_counter() - t0)
            return getattr(torch.ops, namespace)
        except Exception as exc:  # no compiler or ninja, a failed build: the torch path serves
            reason = f"building {source.name} failed: {exc}"
    logger.warning("%s unavailable, decoding with the torch path: %s", what, reason)
    return None


@functools.cache  # built and loaded once per process; the reason is logged once
def load() -> Any | None:
    """Build (first use) and load the extension; ``torch.ops.rnnserve_cpu``, or None when it cannot."""
    flags = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off"]
    return build_extension("rnnserve_cpu_decode", _SOURCE, flags, "rnnserve_cpu", "fused CPU decode kernels")
