"""Named initial states (RWKV "state tuning" and saved prompts): ``--state-dir`` holds one safetensors
file per name, in the prefix cache's format (``prefix_cache.save_state_file``), so a file names the
model, dtype and state shapes it belongs to and a state of another model is refused.

A request may start from a named state (``initial_state``), and a prompt's final state may be saved
under a name (``POST /v1/states``). Loaded states are kept in memory after their first use, and
loaded again when their file changed (another process saved that name: several Ray Serve replicas
share one folder) or is gone. The engine thread reads and writes through here while the server thread
validates names, hence the lock.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

from rnnserve.engine.prefix_cache import StateIdentity, load_state_file, save_state_file
from rnnserve.engine.state_pool import Snapshot, StatePool

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StateNotFoundError(ValueError):
    """No usable state of that name (unknown, malformed name, or a state of another model)."""


def check_state_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name.endswith(".tmp"):
        raise StateNotFoundError(
            f"{name!r} is not a state name: 1 to 128 letters, digits, '.', '_' or '-', the first a letter or digit"
        )


class StateStore:
    def __init__(self, folder: Path, identity: StateIdentity, pool: StatePool) -> None:
        self.folder = folder
        self.identity = identity
        self.pool = pool
        self._loaded: dict[str, Snapshot] = {}
        self._versions: dict[str, str] = {}  # name -> hash of its file, to tell a re-saved state apart
        self._stats: dict[str, tuple[int, int, int]] = {}  # name -> (inode, size, mtime) of the file loaded
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def get(self, name: str) -> Snapshot:
        """The state saved under ``name``; StateNotFoundError if there is none this model can use."""
        check_state_name(name)
        with self._lock:
            path = self._path(name)
            stat = _stat(path)
            if stat is None:
                self._forget(name)
                raise StateNotFoundError(f"there is no state named {name!r}")
            if name in self._loaded and self._stats[name] == stat:
                return self._loaded[name]
            # Saves replace the file atomically (a new inode), so a reader never loads half a file.
            try:
                snapshot, _ = load_state_file(path, self.identity, self.pool)
            except ValueError as exc:
                self._forget(name)
                raise StateNotFoundError(f"the state {name!r} cannot be used with this model: {exc}") from exc
            self._loaded[name] = snapshot
            self._versions[name] = _file_hash(path)
            self._stats[name] = stat
            return snapshot

    def _forget(self, name: str) -> None:
        self._loaded.pop(name, None)
        self._versions.pop(name, None)
        self._stats.pop(name, None)

    def version(self, name: str) -> str:
        """A hash of the state's file, as loaded (``get`` first)."""
        self.get(name)
        with self._lock:
            return self._versions[name]

    def save(self, name: str, snapshot: Snapshot, num_tokens: int) -> None:
        check_state_name(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            save_state_file(self._path(name), snapshot, self.identity, {"num_tokens": str(num_tokens)})
            self._loaded[name] = [{k: t.to("cpu") for k, t in layer.items()} for layer in snapshot]
            self._versions[name] = _file_hash(self._path(name))
            self._stats[name] = _stat(self._path(name)) or (0, 0, 0)

    def names(self) -> list[str]:
        return state_names(self.folder)


def state_names(folder: Path) -> list[str]:
    """The names saved in a state folder (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.safetensors"))


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
