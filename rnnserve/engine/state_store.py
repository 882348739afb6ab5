"""Named initial states (RWKV "state tuning" and saved prompts): ``--state-dir`` holds one safetensors
file per name, in the prefix cache's format (``prefix_cache.save_state_file``), so a file names the
model, dtype and state shapes it belongs to and a state of another model is refused.

A request may start from a named state (``initial_state``), and a prompt's final state may be saved
under a name (``POST /v1/states``). Loaded states are kept in memory after their first use. The
engine thread reads and writes through here while the server thread validates names, hence the lock.
"""

from __future__ import annotations

import hashlib
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
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def get(self, name: str) -> Snapshot:
        """The state saved under ``name``; StateNotFoundError if there is none this model can use."""
        check_state_name(name)
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            path = self._path(name)
            if not path.is_file():
                raise StateNotFoundError(f"there is no state named {name!r}")
            try:
                snapshot, _ = load_state_file(path, self.identity, self.pool)
            except ValueError as exc:
                raise StateNotFoundError(f"the state {name!r} cannot be used with this model: {exc}") from exc
            self._loaded[name] = snapshot
            self._versions[name] = _file_hash(path)
            return snapshot

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

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.safetensors"))


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
