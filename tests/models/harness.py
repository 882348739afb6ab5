"""Shared checks every family runs: chunked prefill == one-shot prefill == token-by-token decode,
and a batch of sequences == each sequence alone. Operates on the bare model interface."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from rnnserve.config import KVCacheConfig
from rnnserve.engine.kv_cache import KVCache
from rnnserve.models.base import (
    DecodeBatch,
    MixedBatch,
    PagedKVMetadata,
    PrefillBatch,
    RecurrentLM,
    States,
    last_token_indices,
)

# Tokens a harness KV cache holds per sequence (models without a max_model_len of their own).
KV_TOKENS_PER_SEQ = 1024


class PagedStates(list):
    """``States`` plus, for a model with attention layers, the paged KV cache of the same slots."""

    kv_cache: KVCache | None = None


def alloc_states(model: RecurrentLM, num_slots: int) -> States:
    """Fresh per-layer states [num_slots, *shape], filled with each spec's initial value, and a KV
    cache with room for every slot when the model has attention layers."""
    device = model.device
    states = PagedStates(
        {s.name: torch.full((num_slots, *s.shape), s.fill, dtype=s.dtype, device=device) for s in layer}
        for layer in model.state_specs()
    )
    if model.kv_specs():
        max_len = getattr(model, "max_model_len", KV_TOKENS_PER_SEQ)
        states.kv_cache = KVCache(model.kv_specs(), KVCacheConfig(), num_slots, max_len, device)
    return states


def kv_metadata(
    states: States | None, slots: Sequence[int], starts: Sequence[int], lens: Sequence[int]
) -> PagedKVMetadata | None:
    """Blocks for tokens ``[start, start + len)`` of each slot, allocated as needed, and the step's
    metadata; None for a model without attention layers."""
    cache = getattr(states, "kv_cache", None)
    if cache is None:
        return None
    ends = [st + n for st, n in zip(starts, lens)]
    for slot, end in zip(slots, ends):
        assert cache.allocate(slot, end), "the harness KV cache is sized to hold every slot"
    return cache.metadata(list(slots), ends, list(lens))


def decode_batch(
    tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int], device: torch.device, states: States
) -> DecodeBatch:
    return DecodeBatch(
        input_ids=torch.tensor(list(tokens), dtype=torch.long, device=device),
        positions=torch.tensor(list(positions), dtype=torch.long, device=device),
        slot_ids=torch.tensor(list(slots), dtype=torch.long, device=device),
        kv=kv_metadata(states, slots, positions, [1] * len(slots)),
    )


def snapshot(states: States, slot: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v[slot].detach().clone() for k, v in layer.items()} for layer in states]


def prefill_batch(
    seqs: Sequence[Sequence[int]],
    slots: Sequence[int],
    starts: Sequence[int],
    device: torch.device,
    all_logits=False,
    states: States | None = None,
) -> PrefillBatch:
    """Pack token lists; ``starts`` are each sequence's absolute position of its first token.
    ``states`` from ``alloc_states``: where a model with attention layers keeps its KV blocks."""
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
    pos = torch.tensor([st + i for s, st in zip(seqs, starts) for i in range(len(s))], dtype=torch.long, device=device)
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    cu = cu.to(device)
    idx = torch.arange(ids.shape[0], device=device) if all_logits else last_token_indices(cu)
    return PrefillBatch(
        input_ids=ids,
        positions=pos,
        cu_seqlens=cu,
        slot_ids=torch.tensor(list(slots), dtype=torch.long, device=device),
        logits_indices=idx,
        cu_seqlens_cpu=[0, *itertools.accumulate(len(s) for s in seqs)],
        kv=kv_metadata(states, slots, starts, [len(s) for s in seqs]),
    )


@torch.no_grad()
def prefill_in_chunks(
    model: RecurrentLM, states: States, seqs: Sequence[Sequence[int]], slots: Sequence[int], chunk: int | None
) -> torch.Tensor:
    """Prefill all sequences together, ``chunk`` tokens per sequence per call (None: one shot).
    Returns the logits [B, V] of each sequence's last token."""
    chunk = chunk or max(len(s) for s in seqs)
    out: list[torch.Tensor | None] = [None] * len(seqs)
    start = 0
    while start < max(len(s) for s in seqs):
        live = [i for i, s in enumerate(seqs) if start < len(s)]
        batch = prefill_batch(
            [seqs[i][start : start + chunk] for i in live],
            [slots[i] for i in live],
            [start] * len(live),
            model.device,
            states=states,
        )
        logits = model.prefill(batch, states)
        for j, i in enumerate(live):
            out[i] = logits[j]
        start += chunk
    return torch.stack(out)  # type: ignore[arg-type]


@torch.no_grad()
def decode_one_by_one(
    model: RecurrentLM, states: States, seq: Sequence[int], slot: int, start: int = 0
) -> torch.Tensor:
    """Feed ``seq`` through ``decode`` one token at a time; logits [len(seq), V]."""
    dev = model.device
    rows = []
    for i, t in enumerate(seq):
        batch = decode_batch([t], [start + i], [slot], dev, states)
        rows.append(model.decode(batch, states)[0])
    return torch.stack(rows)


@torch.no_grad()
def greedy_generate(model: RecurrentLM, prompt: Sequence[int], steps: int, chunk: int | None = None) -> list[int]:
    """Prefill then greedy decode with our model, one sequence in slot 1."""
    states = alloc_states(model, 2)
    logits = prefill_in_chunks(model, states, [prompt], [1], chunk)[0]
    out = []
    pos = len(prompt)
    for _ in range(steps):
        tok = int(logits.argmax())
        out.append(tok)
        batch = decode_batch([tok], [pos], [1], model.device, states)
        logits = model.decode(batch, states)[0]
        pos += 1
    return out


def assert_states_close(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]], atol: float, rtol: float):
    for layer, (la, lb) in enumerate(zip(a, b)):
        for name in la:
            torch.testing.assert_close(
                la[name].float(), lb[name].float(), atol=atol, rtol=rtol, msg=lambda m, n=name, l=layer: f"{l}.{n}: {m}"
            )


def check_chunked_prefill(
    model: RecurrentLM,
    prompt: Sequence[int],
    chunk_sizes: Sequence[int] = (1, 2, 3, 7, 64),
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> None:
    """Chunked prefill for every chunk size == one-shot prefill == token-by-token decode:
    last-token logits and every final state."""
    ref_states = alloc_states(model, 2)
    ref_logits = prefill_in_chunks(model, ref_states, [prompt], [1], None)[0]
    ref = snapshot(ref_states, 1)
    for chunk in chunk_sizes:
        states = alloc_states(model, 3)
        logits = prefill_in_chunks(model, states, [prompt], [2], chunk)[0]
        torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=rtol, msg=lambda m, c=chunk: f"chunk {c}: {m}")
        assert_states_close(snapshot(states, 2), ref, atol, rtol)
    states = alloc_states(model, 2)
    step_logits = decode_one_by_one(model, states, prompt, 1)[-1]
    torch.testing.assert_close(step_logits, ref_logits, atol=atol, rtol=rtol)
    assert_states_close(snapshot(states, 1), ref, atol, rtol)


def check_resumed_varlen_prefill(
    fast: RecurrentLM,
    ref: RecurrentLM,
    prompts: Sequence[Sequence[int]],
    slots: Sequence[int],
    split: int,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> None:
    """``fast`` == ``ref`` on a packed varlen batch (slots not 0..B-1) resumed from the states a first
    chunk of ``split`` tokens (or the whole prompt) left: every token's logits, greedy tokens, states."""
    got, want = alloc_states(fast, max(slots) + 1), alloc_states(ref, max(slots) + 1)
    for states, model in ((got, fast), (want, ref)):
        model.prefill(prefill_batch([p[:split] for p in prompts], slots, [0] * len(prompts), model.device), states)
    rest = [(p[split:], s) for p, s in zip(prompts, slots) if len(p) > split]
    seqs, rest_slots, starts = [r for r, _ in rest], [s for _, s in rest], [split] * len(rest)
    a = fast.prefill(prefill_batch(seqs, rest_slots, starts, fast.device, all_logits=True), got)
    b = ref.prefill(prefill_batch(seqs, rest_slots, starts, ref.device, all_logits=True), want)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert_states_close(got, want, atol=atol, rtol=rtol)


def check_mixed_step(
    fast: RecurrentLM, ref: RecurrentLM, prompts: Sequence[Sequence[int]], atol: float = 1e-4, rtol: float = 1e-4
) -> None:
    """``fast`` == ``ref`` on one ``mixed`` pass: the first two prompts prefilled (slots 1, 4) then each
    decoding a token, beside the last two prefilled from scratch (slots 2, 5): logits, greedy tokens and
    states."""
    out = []
    for model in (fast, ref):
        states = alloc_states(model, 6)
        model.prefill(prefill_batch(prompts[:2], [1, 4], [0, 0], model.device), states)
        dec = decode_batch([3, 8], [len(p) for p in prompts[:2]], [1, 4], model.device, states)
        pre = prefill_batch(prompts[2:], [2, 5], [0, 0], model.device)
        out.append((model.mixed(MixedBatch.pack(dec, pre), states), states))
    (a, got), (b, want) = out
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert_states_close(got, want, atol=atol, rtol=rtol)


def check_batch_equals_alone(
    model: RecurrentLM, prompts: Sequence[Sequence[int]], atol: float = 1e-4, rtol: float = 1e-4
) -> None:
    """A packed batch (slots not 0..B-1) gives each sequence the logits and states it gets alone,
    then a batched decode step does too."""
    n = len(prompts)
    slots = [2 * i + 3 for i in range(n)]
    states = alloc_states(model, 2 * n + 4)
    batch_logits = prefill_in_chunks(model, states, prompts, slots, None)
    next_tok = batch_logits.argmax(-1)
    dev = model.device
    dec = model.decode(decode_batch(next_tok.tolist(), [len(p) for p in prompts], slots, dev, states), states)
    for i, p in enumerate(prompts):
        alone_states = alloc_states(model, 2)
        alone = prefill_in_chunks(model, alone_states, [p], [1], None)[0]
        torch.testing.assert_close(batch_logits[i], alone, atol=atol, rtol=rtol)
        alone_dec = decode_one_by_one(model, alone_states, [int(next_tok[i])], 1, start=len(p))[0]
        torch.testing.assert_close(dec[i], alone_dec, atol=atol, rtol=rtol)
        assert_states_close(snapshot(states, slots[i]), snapshot(alone_states, 1), atol, rtol)
