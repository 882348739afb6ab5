"""A tiny deterministic RecurrentLM for engine tests.

Per layer a tanh RNN ``h <- tanh(W h + E[x])`` (state ``h [D]``, fp32) plus a counter state ``n [1]``
that starts at -1 (a non-zero fill, to check resets). Logits depend on the whole history, so any
state mix-up between slots changes tokens. The per-token loop in ``prefill`` is fine here: this is a
test double, not a kernel.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rnnserve.kernels.dispatch import Backend
from rnnserve.models.base import DecodeBatch, PrefillBatch, RecurrentLM, States, StateSpec


class FakeRecurrentLM(RecurrentLM):
    def __init__(self, vocab_size: int = 97, hidden: int = 16, num_layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden = hidden
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab_size, hidden, generator=gen))
        self.w = nn.Parameter(torch.randn(num_layers, hidden, hidden, generator=gen) / hidden**0.5)
        self.head = nn.Parameter(torch.randn(vocab_size, hidden, generator=gen) * 3.0)
        self.num_layers = num_layers
        self.fail_with: Exception | None = None  # raise this from the next forward call
        self.calls: list[tuple[str, int, int]] = []  # (prefill|decode, sequences, tokens)

    def state_specs(self) -> list[list[StateSpec]]:
        return [
            [StateSpec("h", (self.hidden,), torch.float32), StateSpec("n", (1,), torch.float32, fill=-1.0)]
            for _ in range(self.num_layers)
        ]

    def _step(self, tokens: torch.Tensor, slots: torch.Tensor, states: States) -> torch.Tensor:
        """One token per row: tokens [B], slots [B] -> logits [B, V]; updates states in place."""
        x = self.embed[tokens]  # [B, D]
        for layer, st in enumerate(states):
            h = torch.tanh(st["h"][slots] @ self.w[layer].T + x)  # [B, D]
            st["h"][slots] = h
            st["n"][slots] += 1.0
            x = h
        return (x @ self.head.T).float()

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc

    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        self._maybe_fail()
        self.calls.append(("prefill", batch.num_seqs, batch.num_tokens))
        cu = batch.cu_seqlens.tolist()
        logits = torch.empty(batch.num_tokens, self.vocab_size)
        for b in range(batch.num_seqs):
            slot = batch.slot_ids[b : b + 1]
            for t in range(cu[b], cu[b + 1]):
                logits[t] = self._step(batch.input_ids[t : t + 1], slot, states)[0]
        return logits[batch.logits_indices]

    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        self._maybe_fail()
        self.calls.append(("decode", batch.num_seqs, batch.num_seqs))
        return self._step(batch.input_ids, batch.slot_ids, states)

    @classmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> FakeRecurrentLM:
        return cls(vocab_size=config.get("vocab_size", 97))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return set()
