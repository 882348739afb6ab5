"""C++ CPU kernels that the default path uses (the prefill conv and scan), loaded without stalling a
server: where torch's extension cache already holds a current build (``make install`` makes one) the
first call loads it at once; where it holds none, or a stale one (made from another checkout, with other
flags, or before an edit of the source or a header), compiling takes a minute or more, so it is built on
a background thread while callers keep taking the torch path, which they do when ``ready()`` says None.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class LazyExtension:
    """One C++ source built by ``cpu_decode.build_extension`` (its warning names the reason it failed)."""

    def __init__(self, name: str, source: Path, cflags: list[str], namespace: str, what: str) -> None:
        self.name, self.source, self.cflags, self.namespace, self.what = name, source, cflags, namespace, what
        self._lock = threading.Lock()  # held while building or loading
        self._start_lock = threading.Lock()
        self._done = False
        self._ops: Any | None = None
        self._thread: threading.Thread | None = None

    def load(self) -> Any | None:
        """Build if needed and load, waiting for it; the op namespace, or None when it cannot."""
        with self._lock:
            if not self._done:
                from rnnserve.kernels.cpu_decode import build_extension

                self._ops = build_extension(self.name, self.source, self.cflags, self.namespace, self.what)
                self._done = True
            return self._ops

    def ready(self) -> Any | None:
        """The op namespace when loaded, else None without waiting: the first call loads a cached build
        at once, or starts building on a background thread when there is none."""
        if self._done:
            return self._ops
        if self._thread is not None:  # building in the background
            return None
        if self._current():
            return self.load()
        with self._start_lock:
            if self._thread is None:
                logger.info("building the %s in the background; the torch path serves until it is ready", self.what)
                self._thread = threading.Thread(target=self.load, name=f"build-{self.name}", daemon=True)
                self._thread.start()
        return None

    def _current(self) -> bool:
        """Whether torch's extension cache holds a build that loads without compiling (a stale one
        would be rebuilt by ``load``, on the caller's thread)."""
        from rnnserve.kernels.cpu_decode import build_is_current

        return build_is_current(self.name, self.source, self.cflags)
