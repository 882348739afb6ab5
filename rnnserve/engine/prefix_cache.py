"""The prefix state cache: a radix tree over token ids whose nodes hold state snapshots.

A recurrent model's memory of a token prefix is its slot state after that prefix: a few tensors of
fixed size, whatever the prefix length. Keeping the state of prefixes the server has seen lets a
request that starts with one of them (a chat turn resending its conversation, a shared system
prompt) resume from it and prefill only the rest.

- ``insert(tokens, slot)`` stores a copy of every state tensor of ``slot``, which must hold exactly
  the state after ``tokens`` (the scheduler calls it at interval boundaries of a prefill, at the end
  of a prompt, and when a request finishes with the prefix it has actually fed).
- ``restore_longest(tokens, slot, limit)`` copies the deepest snapshot whose key is a prefix of
  ``tokens`` and at most ``limit`` tokens long into ``slot`` and returns its length (0: no hit).

Snapshots sit in one of two tiers, each with a byte budget and LRU order: the device tier (tensors
on the pool's device) and the host tier (CPU). New snapshots enter the device tier; the device
tier's least recently used snapshots spill to the host tier; the host tier's are evicted. With a
cache folder, every snapshot in the cache also has a safetensors file there (written when inserted,
deleted when evicted; ``CacheWriter`` does both in a background thread, so a slow disk does not
hold up the step loop, and ``flush`` waits for it), so a restarted server loads them back. The
folder's ``index.json`` and each file's metadata name the model identity, dtype and state shapes; a
file of another model, another dtype or that does not load is skipped with a warning, never loaded.

Trees are kept per namespace: the default one (""), and one per initial state (a prefix run from a
loaded state is another state than the same prefix run from zero).

Models with attention layers (the Transformer baseline, hybrids) keep part of their memory in the
engine's paged KV cache. Their entries hold, beside the snapshot of the slot's recurrent state at
token t, references to the KV blocks covering tokens [0, t) (``KVCache.retain``): the full blocks
are shared with every sequence that restores the entry, and its partial last block (t is any token,
not a block edge) is copied into a private block of the restoring slot (``KVCache.share``), so a
hit is exact at any token, as for a pure recurrent model. Those blocks count against the KV budget;
when the KV cache runs short, it reclaims them by evicting the least recently used entries whose
blocks nobody else holds (``reclaim_kv_blocks``), before the scheduler preempts a running request.
In the cache folder such an entry's file also holds the keys and values of its partial last block,
and each full block is a file of its own (``kv-<hash>.safetensors``, named by the token prefix it
ends: written once, however many entries share it, deleted with the last of them); a restarted
server loads entries into free blocks, newest first, while blocks are free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from rnnserve.config import PrefixCacheConfig
from rnnserve.engine.cache_writer import CacheWriter
from rnnserve.engine.kv_cache import KVCache
from rnnserve.engine.state_pool import Snapshot, StatePool

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
BLOCK_FILE_PREFIX = "kv-"  # a full KV block of a cache entry, shared by every entry that holds it
DEVICE, HOST = "device", "host"


@dataclass(frozen=True)
class StateIdentity:
    """What a saved state must match to be loaded: the model and the layout of its states."""

    model: str  # a fingerprint of the weights (see ``model_fingerprint``)
    dtype: str  # the model dtype
    state_shapes: str  # JSON of [[name, shape, dtype], ...] per layer

    def as_metadata(self) -> dict[str, str]:
        return {"model": self.model, "dtype": self.dtype, "state_shapes": self.state_shapes}

    def mismatch(self, meta: dict[str, str] | None) -> str | None:
        """Why a file with this metadata is not ours, or None when it is."""
        if not meta:
            return "no metadata"
        for key, ours in self.as_metadata().items():
            if meta.get(key) != ours:
                return f"another {key.replace('_', ' ')} ({meta.get(key)!r:.80} here, {ours!r:.80} served)"
        return None


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model's weights: names, shapes, dtypes and the first and last 64
    values of every parameter and buffer. Two checkpoints of one architecture differ in it."""
    h = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float64)
                h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def state_identity(model: torch.nn.Module, pool: StatePool, kv_cache: KVCache | None = None) -> StateIdentity:
    shapes = [[[s.name, list(s.shape), str(s.dtype)] for s in layer] for layer in pool.specs]
    layout: object = shapes
    if kv_cache is not None:  # cache entries hold KV blocks too: their layout must match as well
        kv = [[s.num_kv_heads, s.head_dim, str(s.dtype)] for s in kv_cache.specs]
        layout = {"states": shapes, "kv": kv, "block_size": kv_cache.block_size}
    dtype = str(next(model.parameters()).dtype)
    return StateIdentity(model=model_fingerprint(model), dtype=dtype, state_shapes=json.dumps(layout))


def snapshot_nbytes(snapshot: Snapshot) -> int:
    return sum(t.numel() * t.element_size() for layer in snapshot for t in layer.values())


def save_state_file(
    path: Path,
    snapshot: Snapshot,
    identity: StateIdentity,
    extra: dict[str, str],
    more: dict[str, torch.Tensor] | None = None,
) -> None:
    """One snapshot as safetensors: tensors ``"{layer}.{name}"`` (and ``more``), identity and ``extra``
    as metadata."""
    from safetensors.torch import save_file

    tensors = {f"{i}.{name}": t.to("cpu").contiguous() for i, layer in enumerate(snapshot) for name, t in layer.items()}
    tensors.update({name: t.to("cpu").contiguous() for name, t in (more or {}).items()})
    # A name of its own: processes sharing a folder (Ray Serve replicas) may save one name at once.
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    save_file(tensors, str(tmp), metadata={**identity.as_metadata(), **extra})
    tmp.replace(path)  # a reader never sees a half-written file


def load_state_file(path: Path, identity: StateIdentity, pool: StatePool) -> tuple[Snapshot, dict[str, str]]:
    """A snapshot saved by ``save_state_file``; ValueError if it is not a state of the served model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            why = identity.mismatch(meta)
            if why is not None:
                raise ValueError(f"{path.name} is a state of {why}")
            snapshot: Snapshot = []
            for i, layer in enumerate(pool.specs):
                saved: dict[str, torch.Tensor] = {}
                for spec in layer:
                    t = f.get_tensor(f"{i}.{spec.name}")
                    if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                        raise ValueError(f"{path.name}: {i}.{spec.name} is {tuple(t.shape)} {t.dtype}")
                    saved[spec.name] = t
                snapshot.append(saved)
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own errors for truncated or garbage files
        raise ValueError(f"{path.name} does not load: {type(exc).__name__}: {exc}") from exc
    return snapshot, meta


def _save_kv_rows(path: Path, rows: list[tuple[torch.Tensor, torch.Tensor]], identity: StateIdentity) -> None:
    from safetensors.torch import save_file

    tensors = {f"{i}.{kv}": t.contiguous() for i, pair in enumerate(rows) for kv, t in zip("kv", pair)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=identity.as_metadata())
    tmp.replace(path)


def _load_kv_rows(
    path: Path, prefix: str, num_rows: int, kv_cache: KVCache, identity: StateIdentity
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values ``"{prefix}{layer}.k|v"`` of ``num_rows`` tokens per attention layer, checked
    against the served model and KV layout; ValueError if they are not there or not ours."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            why = identity.mismatch(f.metadata() or {})
            if why is not None:
                raise ValueError(f"{path.name} holds KV blocks of {why}")
            rows = []
            for i, spec in enumerate(kv_cache.specs):
                pair = tuple(f.get_tensor(f"{prefix}{i}.{kv}") for kv in "kv")
                for t in pair:
                    if tuple(t.shape) != (num_rows, spec.num_kv_heads, spec.head_dim) or t.dtype != spec.dtype:
                        raise ValueError(f"{path.name}: {prefix}{i} is {tuple(t.shape)} {t.dtype}")
                rows.append(pair)
    except ValueError:
        raise
    except Exception as exc:  # a missing, truncated or garbage file
        raise ValueError(f"{path.name} does not load: {type(exc).__name__}: {exc}") from exc
    return rows  # type: ignore[return-value]


@dataclass(eq=False)
class _Node:
    """A radix-tree node: ``key`` is the edge label from its parent; ``entry`` its snapshot, if any."""

    key: tuple[int, ...]
    parent: _Node | None
    depth: int  # tokens from the root to the end of this node
    children: dict[int, _Node] = field(default_factory=dict)
    entry: _Entry | None = None


@dataclass(eq=False)
class _Entry:
    node: _Node
    namespace: str
    snapshot: Snapshot
    nbytes: int
    tier: str
    file: Path | None = None
    blocks: list[int] = field(default_factory=list)  # KV blocks covering the prefix (models with attention)
    block_keys: list[str] = field(default_factory=list)  # the block files of its full blocks (cache folder)


@dataclass(frozen=True)
class PrefixCacheStats:
    queries: int  # prompt tokens looked up (vLLM's prefix_cache_queries)
    hits: int  # of those, tokens restored from a snapshot (vLLM's prefix_cache_hits)
    device_bytes: int
    host_bytes: int
    device_entries: int
    host_entries: int
    evictions: int  # snapshots dropped from the cache (host tier full, or their KV blocks reclaimed)
    spills: int  # snapshots moved from the device tier to the host tier
    kv_blocks: int = 0  # KV blocks held by cache entries only (reclaimable)


class PrefixCache:
    def __init__(
        self, pool: StatePool, config: PrefixCacheConfig, identity: StateIdentity, kv_cache: KVCache | None = None
    ) -> None:
        self.pool = pool
        self.kv_cache = kv_cache
        if kv_cache is not None:
            kv_cache.reclaim = self.reclaim_kv_blocks
        self.config = config
        self.identity = identity
        self._roots: dict[str, _Node] = {}
        self._tiers: dict[str, OrderedDict[int, _Entry]] = {DEVICE: OrderedDict(), HOST: OrderedDict()}
        self._bytes = {DEVICE: 0, HOST: 0}
        self._budget = {DEVICE: config.device_memory, HOST: config.host_memory}
        self.queries = 0
        self.hits = 0
        self.evictions = 0
        self.spills = 0
        self._dir: Path | None = None
        self._block_files: dict[str, int] = {}  # block file key -> entries whose file names it
        self.writer: CacheWriter | None = CacheWriter() if config.cache_dir is not None else None
        if pool.bytes_per_slot > max(config.device_memory, config.host_memory):
            logger.warning(
                "prefix cache: one state is %d bytes, more than both budgets (%d device, %d host): nothing is cached",
                pool.bytes_per_slot,
                config.device_memory,
                config.host_memory,
            )
        if config.cache_dir is not None:
            self._open_dir(Path(config.cache_dir))

    # -- lookup and insertion ------------------------------------------------------------------

    def restore_longest(self, tokens: list[int], slot: int, limit: int, namespace: str = "") -> int:
        """Restore the longest cached prefix of ``tokens`` of at most ``limit`` tokens into ``slot``;
        its length, 0 when there is none (the slot is then left as it was)."""
        self.queries += len(tokens)
        entry = self._longest(tokens, limit, namespace)
        if entry is None:
            return 0
        if self.kv_cache is not None and not self.kv_cache.share(slot, entry.blocks, entry.node.depth):
            return 0  # no block left for the copy of its partial last block: run the prompt from the start
        self.pool.restore(slot, entry.snapshot)
        self._tiers[entry.tier].move_to_end(id(entry))
        self.hits += entry.node.depth
        return entry.node.depth

    def longest_prefix(self, tokens: list[int], limit: int, namespace: str = "") -> int:
        """The length ``restore_longest`` would restore, without restoring or counting it."""
        entry = self._longest(tokens, limit, namespace)
        return 0 if entry is None else entry.node.depth

    def contains(self, tokens: list[int], namespace: str = "") -> bool:
        node = self._find(tokens, namespace)
        return node is not None and node.entry is not None

    def insert(self, tokens: list[int], slot: int, namespace: str = "") -> bool:
        """Snapshot ``slot`` (the state after exactly ``tokens``, and with a KV cache its blocks holding
        them) under ``tokens``. An existing entry is only marked used. False when the snapshot fits in
        no tier."""
        if not tokens:
            return False
        node = self._find(tokens, namespace)
        if node is not None and node.entry is not None:
            self._tiers[node.entry.tier].move_to_end(id(node.entry))
            return True
        nbytes = self.pool.bytes_per_slot
        tier = DEVICE if nbytes <= self._budget[DEVICE] else HOST if nbytes <= self._budget[HOST] else None
        if tier is None:
            return False
        device = self.pool.device if tier == DEVICE else torch.device("cpu")
        snapshot = self.pool.snapshot(slot, device=device)
        blocks: list[int] = []
        if self.kv_cache is not None:
            blocks = self.kv_cache.block_table(slot)[: self.kv_cache.blocks_for(len(tokens))]
            if len(blocks) != self.kv_cache.blocks_for(len(tokens)):
                raise ValueError(f"slot {slot} holds {len(blocks)} KV blocks, fewer than {len(tokens)} tokens need")
            self.kv_cache.retain(blocks)
        self._add(tokens, namespace, snapshot, tier, blocks=blocks)
        return True

    def reclaim_kv_blocks(self, need: int) -> None:
        """Evict least recently used entries (host tier first, then device) whose KV blocks nobody
        else holds, until ``need`` blocks are free or no entry can free any (the KV cache's reclaimer)."""
        kv = self.kv_cache
        assert kv is not None
        freed, progress = 0, True
        # Another pass after one that evicted: an entry skipped earlier may hold blocks alone now (a
        # shorter prefix of an evicted one).
        while freed < need and progress:
            progress = False
            for tier in (HOST, DEVICE):
                for entry in list(self._tiers[tier].values()):
                    if freed >= need:
                        return
                    n = kv.frees_on_release(entry.blocks)
                    if n == 0:
                        continue  # a running sequence or another entry holds its blocks too: evicting frees nothing
                    del self._tiers[tier][id(entry)]
                    self._bytes[tier] -= entry.nbytes
                    self._drop(entry)
                    freed += n
                    progress = True

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            queries=self.queries,
            hits=self.hits,
            device_bytes=self._bytes[DEVICE],
            host_bytes=self._bytes[HOST],
            device_entries=len(self._tiers[DEVICE]),
            host_entries=len(self._tiers[HOST]),
            evictions=self.evictions,
            spills=self.spills,
            kv_blocks=self.kv_cache.num_cached_blocks if self.kv_cache is not None else 0,
        )

    def __len__(self) -> int:
        return len(self._tiers[DEVICE]) + len(self._tiers[HOST])

    def prefixes(self, namespace: str = "") -> list[list[int]]:
        """Every cached prefix of a namespace (tests, debugging)."""
        out: list[list[int]] = []
        stack = [(self._roots.get(namespace), ())] if namespace in self._roots else []
        while stack:
            node, prefix = stack.pop()
            assert node is not None
            path = (*prefix, *node.key)
            if node.entry is not None:
                out.append(list(path))
            stack.extend((c, path) for c in node.children.values())
        return sorted(out)

    # -- the tree ------------------------------------------------------------------------------

    def _longest(self, tokens: list[int], limit: int, namespace: str) -> _Entry | None:
        node = self._roots.get(namespace)
        best: _Entry | None = None
        i = 0
        while node is not None and i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None or child.depth > limit:
                break
            if tuple(tokens[i : i + len(child.key)]) != child.key:
                break  # diverges inside the edge: no snapshot there
            i += len(child.key)
            node = child
            if node.entry is not None:
                best = node.entry
        return best

    def _find(self, tokens: list[int], namespace: str) -> _Node | None:
        node = self._roots.get(namespace)
        i = 0
        while node is not None and i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None or tuple(tokens[i : i + len(child.key)]) != child.key:
                return None
            i += len(child.key)
            node = child
        return node if i == len(tokens) else None

    def _node_for(self, tokens: list[int], namespace: str) -> _Node:
        """The node ending exactly at ``tokens``, created (splitting an edge if needed)."""
        node = self._roots.setdefault(namespace, _Node(key=(), parent=None, depth=0))
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(key=tuple(tokens[i:]), parent=node, depth=len(tokens))
                node.children[tokens[i]] = leaf
                return leaf
            common = 0
            limit = min(len(child.key), len(tokens) - i)
            while common < limit and child.key[common] == tokens[i + common]:
                common += 1
            if common < len(child.key):
                # Split the edge: node -> mid (child.key[:common]) -> child (the rest).
                mid = _Node(key=child.key[:common], parent=node, depth=node.depth + common)
                node.children[tokens[i]] = mid
                child.key = child.key[common:]
                child.parent = mid
                mid.children[child.key[0]] = child
                child = mid
            i += common
            node = child
        return node

    def _prune(self, node: _Node) -> None:
        """Remove entry-less leaves upward and merge entry-less single-child nodes into their child."""
        while node.parent is not None and node.entry is None and not node.children:
            parent = node.parent
            del parent.children[node.key[0]]
            node = parent
        if node.parent is not None and node.entry is None and len(node.children) == 1:
            (child,) = node.children.values()
            child.key = node.key + child.key
            child.parent = node.parent
            node.parent.children[child.key[0]] = child

    # -- tiers ---------------------------------------------------------------------------------

    def _add(
        self,
        tokens: list[int],
        namespace: str,
        snapshot: Snapshot,
        tier: str,
        file: Path | None = None,
        blocks: list[int] | None = None,
        block_keys: list[str] | None = None,
    ) -> None:
        node = self._node_for(tokens, namespace)
        if node.entry is not None:
            if blocks and self.kv_cache is not None:
                self.kv_cache.release(blocks)
            return
        nbytes = snapshot_nbytes(snapshot)
        entry = _Entry(node=node, namespace=namespace, snapshot=snapshot, nbytes=nbytes, tier=tier, blocks=blocks or [])
        node.entry = entry
        self._tiers[tier][id(entry)] = entry
        self._bytes[tier] += entry.nbytes
        if self._dir is not None:
            if file is not None:
                entry.file, entry.block_keys = file, block_keys or []
            else:
                entry.file, entry.block_keys = self._persist(tokens, namespace, snapshot, entry.blocks)
            for key in entry.block_keys:
                self._block_files[key] = self._block_files.get(key, 0) + 1
        self._enforce_budgets()

    def _enforce_budgets(self) -> None:
        device, host = self._tiers[DEVICE], self._tiers[HOST]
        while self._bytes[DEVICE] > self._budget[DEVICE] and device:
            _, entry = device.popitem(last=False)
            self._bytes[DEVICE] -= entry.nbytes
            if entry.nbytes > self._budget[HOST]:
                self._drop(entry)
                continue
            entry.snapshot = [{k: t.to("cpu") for k, t in layer.items()} for layer in entry.snapshot]
            entry.tier = HOST
            host[id(entry)] = entry
            self._bytes[HOST] += entry.nbytes
            self.spills += 1
        while self._bytes[HOST] > self._budget[HOST] and host:
            _, entry = host.popitem(last=False)
            self._bytes[HOST] -= entry.nbytes
            self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        self.evictions += 1
        if self.kv_cache is not None:
            self.kv_cache.release(entry.blocks)
        entry.node.entry = None
        self._prune(entry.node)
        if entry.file is not None:
            assert self.writer is not None
            self.writer.delete(entry.file)
        for key in entry.block_keys:
            self._block_files[key] -= 1
            if self._block_files[key] == 0:  # the last entry that named it
                del self._block_files[key]
                assert self.writer is not None
                self.writer.delete(self._block_path(key))

    # -- persistence ---------------------------------------------------------------------------

    def _open_dir(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        index = folder / INDEX_FILE
        ours = {"format": FORMAT_VERSION, **self.identity.as_metadata()}
        if index.exists():
            try:
                theirs = json.loads(index.read_text())
            except (OSError, ValueError) as exc:
                logger.warning("prefix cache: %s does not load (%s); not using %s", index, exc, folder)
                return
            if theirs != ours:
                why = self.identity.mismatch(theirs if isinstance(theirs, dict) else None) or "another format"
                logger.warning("prefix cache: %s holds states of %s; not using it", folder, why)
                return
        else:
            index.write_text(json.dumps(ours, indent=1))
        self._dir = folder
        files = [p for p in folder.glob("*.safetensors") if not p.name.startswith(BLOCK_FILE_PREFIX)]
        files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        loaded: list[tuple[list[int], str, Snapshot, Path, list[int], list[str]]] = []
        held: dict[str, int] = {}  # block key -> block loaded into the KV cache (held until the end)
        partial: list[int] = []  # loaded partial blocks (held until the end)
        host_bytes = 0
        for path in files:
            try:
                snapshot, meta = load_state_file(path, self.identity, self.pool)
                tokens = json.loads(meta["tokens"])
                namespace = meta.get("namespace", "")
                if not isinstance(tokens, list) or not tokens:
                    raise ValueError(f"{path.name} has no token prefix")
            except (ValueError, KeyError) as exc:
                logger.warning("prefix cache: skipping %s: %s", path, exc)
                continue
            nbytes = snapshot_nbytes(snapshot)
            if host_bytes + nbytes > self._budget[HOST]:
                path.unlink(missing_ok=True)  # ours, but evicted: the host tier is full
                continue
            blocks: list[int] = []
            keys: list[str] = []
            if self.kv_cache is not None:
                try:
                    got = self._load_blocks(path, meta, len(tokens), held, partial)
                except (ValueError, KeyError) as exc:
                    logger.warning("prefix cache: skipping %s: %s", path, exc)
                    continue
                if got is None:
                    path.unlink(missing_ok=True)  # ours, but evicted: no KV block left for it
                    continue
                blocks, keys = got
            host_bytes += nbytes
            loaded.append((tokens, namespace, snapshot, path, blocks, keys))
        for tokens, namespace, snapshot, path, blocks, keys in reversed(loaded):  # oldest first: LRU order kept
            if self.kv_cache is not None:
                self.kv_cache.retain(blocks)
            self._add(tokens, namespace, snapshot, HOST, file=path, blocks=blocks, block_keys=keys)
        if self.kv_cache is not None:
            self.kv_cache.release([*held.values(), *partial])  # blocks no loaded entry holds are free again
            for path in folder.glob(f"{BLOCK_FILE_PREFIX}*.safetensors"):
                if path.name[len(BLOCK_FILE_PREFIX) : -len(".safetensors")] not in self._block_files:
                    path.unlink(missing_ok=True)  # no entry names it any more
        if loaded:
            logger.info("prefix cache: %d snapshots loaded from %s", len(loaded), folder)

    def _load_blocks(
        self, path: Path, meta: dict[str, str], num_tokens: int, held: dict[str, int], partial: list[int]
    ) -> tuple[list[int], list[str]] | None:
        """Load the KV blocks of the entry in ``path`` into free blocks (full blocks from their files,
        once each: ``held``; the partial last block from the entry's file): its blocks and full blocks'
        keys, None when no block is free. ValueError when a file is missing or not ours."""
        kv = self.kv_cache
        assert kv is not None
        keys = json.loads(meta["kv_blocks"])
        if not isinstance(keys, list) or len(keys) != num_tokens // kv.block_size:
            raise ValueError(f"{path.name} names {keys!r:.40} as the KV blocks of {num_tokens} tokens")
        blocks: list[int] = []
        for key in keys:
            if key not in held:
                rows = _load_kv_rows(self._block_path(str(key)), "", kv.block_size, kv, self.identity)
                block = kv.load_block(rows)
                if block is None:
                    return None
                held[key] = block
            blocks.append(held[key])
        rest = num_tokens % kv.block_size
        if rest:
            block = kv.load_block(_load_kv_rows(path, "kv.", rest, kv, self.identity))
            if block is None:
                return None
            partial.append(block)
            blocks.append(block)
        return blocks, keys

    def _block_path(self, key: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{BLOCK_FILE_PREFIX}{key}.safetensors"

    def flush(self) -> None:
        """Wait until the cache folder holds what was inserted and evicted so far (no-op without one)."""
        if self.writer is not None:
            self.writer.flush()

    def _persist(
        self, tokens: list[int], namespace: str, snapshot: Snapshot, blocks: list[int]
    ) -> tuple[Path | None, list[str]]:
        """Queue the writes of an entry's file (and, for a model with attention layers, the files of
        its full KV blocks that are not written yet): its path and block keys, (None, []) when the
        writer refused them (too many writes waiting: the entry is cached in memory only)."""
        assert self._dir is not None and self.writer is not None
        path = self._dir / f"{_digest([namespace, tokens])}.safetensors"
        keys: list[str] = []
        more: dict[str, torch.Tensor] = {}
        kv = self.kv_cache
        if kv is not None:
            # block_rows copies to the host now: once the entry is evicted its blocks may be reused
            # before the writer gets to them. The snapshot's tensors are never written in place.
            full = len(tokens) // kv.block_size
            for j in range(full):
                # Named by the prefix the block ends: equal prefixes share one file.
                key = _digest([namespace, tokens[: (j + 1) * kv.block_size]])
                if key not in self._block_files:
                    block_path = self._block_path(key)
                    rows = kv.block_rows(blocks[j], kv.block_size)
                    if not self.writer.write(block_path, partial(_save_kv_rows, block_path, rows, self.identity)):
                        return None, []  # a block file already queued is removed at the next start-up
                keys.append(key)
            if len(tokens) > full * kv.block_size:
                rows = kv.block_rows(blocks[full], len(tokens) - full * kv.block_size)
                more = {f"kv.{i}.{name}": t for i, pair in enumerate(rows) for name, t in zip("kv", pair)}
        meta = {"tokens": json.dumps(tokens), "namespace": namespace, "kv_blocks": json.dumps(keys)}
        if not self.writer.write(path, partial(save_state_file, path, snapshot, self.identity, meta, more)):
            return None, []
        return path, keys


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:32]
