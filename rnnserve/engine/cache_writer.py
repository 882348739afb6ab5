"""The prefix cache folder's writer: its file writes and deletes run in one background thread, in the
order they were submitted, so a slow or stalled disk never holds up the engine's step loop.

- ``write(path, job)`` queues a job that writes ``path``. At most ``max_pending_writes`` writes wait
  at a time (each holds a snapshot's tensors); past that a write is refused (``False``, counted in
  ``dropped``) rather than blocking a step: its entry stays cached in memory, only a restarted server
  will not have it.
- ``delete(path)`` is never refused (a file left behind by an evicted entry would come back after a
  restart); it waits in the same queue, so a write and a later delete of one file run in that order.
- ``flush()`` waits until every job submitted so far has run (server shutdown and drain call it).

The engine thread submits; the writer thread only runs file jobs (tensors are copied to the host
before submission where the engine may reuse their memory, see ``PrefixCache._persist``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_WRITES = 64

_Job = tuple[bool, Path, Callable[[], None]]  # (is a write, the file, what to run)


class CacheWriter:
    def __init__(self, max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES) -> None:
        if max_pending_writes < 1:
            raise ValueError("max_pending_writes must be >= 1")
        self.max_pending_writes = max_pending_writes
        self.dropped = 0  # writes refused because max_pending_writes were waiting
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._lock = threading.Lock()
        self._pending_writes = 0
        self._thread = threading.Thread(target=self._run, name="rnnserve-cache-writer", daemon=True)
        self._thread.start()

    @property
    def pending_writes(self) -> int:
        with self._lock:
            return self._pending_writes

    def write(self, path: Path, job: Callable[[], None]) -> bool:
        """Queue ``job`` (which writes ``path``); False when it was refused (too many writes waiting)."""
        with self._lock:
            if self._pending_writes >= self.max_pending_writes:
                self.dropped += 1
                return False
            self._pending_writes += 1
        self._jobs.put((True, path, job))
        return True

    def delete(self, path: Path) -> None:
        self._jobs.put((False, path, lambda: path.unlink(missing_ok=True)))

    def flush(self) -> None:
        self._jobs.join()

    def _run(self) -> None:
        while True:
            is_write, path, job = self._jobs.get()
            try:
                job()
            except Exception as exc:  # a full disk, a bad file: log it and keep the writer alive
                logger.warning("prefix cache: cannot %s %s: %s", "write" if is_write else "delete", path, exc)
            finally:
                if is_write:
                    with self._lock:
                        self._pending_writes -= 1
                self._jobs.task_done()
