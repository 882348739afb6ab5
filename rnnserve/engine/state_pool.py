"""The state pool: every running sequence's recurrent state, pre-allocated, addressed by slot.

One tensor per (layer, state name), ``[num_slots, *spec.shape]``. Slot 0 is the padding slot
(CUDA-graph padding rows read and write it), so it is never handed out. Every operation is a
fixed-size copy: nothing here depends on how long a sequence is.
"""

from __future__ import annotations

import heapq

import torch

from rnnserve.config import ConfigError, StatePoolConfig
from rnnserve.models.base import PAD_SLOT, LayerStates, States, StateSpec

# A slot's state on the host: per layer, state name -> [*spec.shape].
Snapshot = list[dict[str, torch.Tensor]]


class StatePool:
    """Slots of per-layer recurrent state for up to ``capacity`` sequences (plus the padding slot)."""

    def __init__(self, specs: list[list[StateSpec]], config: StatePoolConfig, device: torch.device | str) -> None:
        self.specs = specs
        self.device = torch.device(device)
        self.bytes_per_slot = sum(spec.nbytes for layer in specs for spec in layer)
        capacity = config.max_num_seqs
        if config.state_memory is not None:
            # A budget, not a target: the scheduler never runs more than max_num_seqs sequences, so
            # slots beyond that would be memory allocated and never used.
            fits = config.state_memory // max(self.bytes_per_slot, 1)
            if fits < 1:
                raise ConfigError(
                    f"state_memory={config.state_memory} bytes holds no sequence: one needs {self.bytes_per_slot} bytes"
                )
            capacity = min(capacity, fits)
        self.capacity = capacity  # real slots: 1..capacity
        self.num_slots = capacity + 1  # + the padding slot 0
        with torch.no_grad():
            self._states: States = [
                {
                    s.name: torch.full((self.num_slots, *s.shape), s.fill, dtype=s.dtype, device=self.device)
                    for s in layer
                }
                for layer in specs
            ]
        # Min-heap, so the lowest free slot goes first (deterministic, keeps the live slots dense).
        self._free: list[int] = [s for s in range(self.num_slots) if s != PAD_SLOT]
        self._used: set[int] = set()

    @property
    def states(self) -> States:
        """The ``States`` list models read and write in place: ``states[layer][name]`` is ``[num_slots, *shape]``."""
        return self._states

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def usage(self) -> float:
        """Used real slots / real slots, in [0, 1]."""
        return len(self._used) / self.capacity

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_slot * self.num_slots

    def alloc(self) -> int | None:
        """A fresh (reset) slot, or None when all are in use."""
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        self.reset(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    def is_allocated(self, slot: int) -> bool:
        return slot in self._used

    @torch.no_grad()
    def reset(self, slot: int) -> None:
        """Fill the slot with each spec's initial value (zero, or e.g. RWKV-4's -1e30)."""
        self._check(slot)
        for layer, layer_specs in zip(self._states, self.specs):
            for spec in layer_specs:
                layer[spec.name][slot].fill_(spec.fill)

    @torch.no_grad()
    def copy(self, src: int, dst: int) -> None:
        """Copy one slot's state over another's (fork for n > 1, restore from a cached slot)."""
        self._check(src)
        self._check(dst)
        for layer in self._states:
            for tensor in layer.values():
                tensor[dst].copy_(tensor[src])

    @torch.no_grad()
    def snapshot(self, slot: int, device: torch.device | str = "cpu") -> Snapshot:
        """The slot's state copied to ``device`` (host memory by default; offload, prefix cache)."""
        self._check(slot)
        return [{name: t[slot].to(device, copy=True) for name, t in layer.items()} for layer in self._states]

    @torch.no_grad()
    def restore(self, slot: int, snapshot: Snapshot) -> None:
        """Write a snapshot taken by ``snapshot`` back into a slot."""
        self._check(slot)
        if len(snapshot) != len(self._states):
            raise ValueError(f"snapshot has {len(snapshot)} layers, the pool {len(self._states)}")
        for layer, saved in zip(self._states, snapshot):
            for name, tensor in layer.items():
                tensor[slot].copy_(saved[name], non_blocking=False)

    def layer(self, i: int) -> LayerStates:
        return self._states[i]

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 0..{self.num_slots - 1}")
