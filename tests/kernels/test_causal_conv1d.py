"""causal_conv1d: chunk (prefill) and recurrent (decode) against the sequential reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnserve.kernels.causal_conv1d import chunk, naive, recurrent


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu


def _inputs(lens: list[int], C: int = 12, K: int = 4, S: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lens), C, generator=g)
    w = torch.randn(C, K, generator=g)
    b = torch.randn(C, generator=g)
    state = torch.randn(S, C, K - 1, generator=g)
    return x, w, b, state


@pytest.mark.parametrize("lens", [[1], [63], [500], [5, 1, 2, 63, 3], [2, 1]])
@pytest.mark.parametrize("activation", ["silu", None])
def test_chunk_matches_naive_varlen(lens: list[int], activation: str | None) -> None:
    x, w, b, state = _inputs(lens)
    # Slots in a non-trivial order, never 0..B-1; slot 0 (padding) and others must stay untouched.
    slots = torch.tensor([7, 2, 5, 3, 8][: len(lens)], dtype=torch.long)
    ref_state, got_state = state.clone(), state.clone()
    y_ref = naive.causal_conv1d_varlen(x, w, b, ref_state, _cu(lens), slots, activation)
    y = chunk.causal_conv1d_varlen(x, w, b, got_state, _cu(lens), slots, activation)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state, ref_state, atol=0, rtol=0)
    untouched = [s for s in range(state.shape[0]) if s not in slots.tolist()]
    torch.testing.assert_close(got_state[untouched], state[untouched], atol=0, rtol=0)


def test_fresh_sequence_matches_padded_conv1d() -> None:
    """From a zero cache the op is the plain left-padded depthwise conv (what transformers computes)."""
    x, w, b, _ = _inputs([40])
    state = torch.zeros(2, 12, 3)
    y = chunk.causal_conv1d_varlen(x, w, b, state, _cu([40]), torch.tensor([1]), "silu")
    ref = F.silu(F.conv1d(F.pad(x.T[None], (3, 0)), w[:, None, :], b, groups=12))[0].T
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[1], x[-3:].T, atol=0, rtol=0)


@pytest.mark.parametrize("K", [2, 4])
def test_short_prompt_keeps_old_cache_tail(K: int) -> None:
    """A chunk shorter than K-1 shifts into the cache: the old tail survives in front of it."""
    x, w, b, state = _inputs([1], K=K)
    old = state[4].clone()
    chunk.causal_conv1d_varlen(x, w, b, state, _cu([1]), torch.tensor([4]), None)
    torch.testing.assert_close(state[4], torch.cat([old[:, 1:], x.T], dim=1), atol=0, rtol=0)


def test_split_prefill_equals_one_shot() -> None:
    """Chunks of 1, 2, 3 and 7 tokens resume from the cache exactly as one long call."""
    x, w, b, state = _inputs([30])
    one_state = state.clone()
    y_one = chunk.causal_conv1d_varlen(x, w, b, one_state, _cu([30]), torch.tensor([6]), "silu")
    for size in (1, 2, 3, 7):
        st = state.clone()
        parts = [
            chunk.causal_conv1d_varlen(
                x[i : i + size], w, b, st, _cu([len(x[i : i + size])]), torch.tensor([6]), "silu"
            )
            for i in range(0, 30, size)
        ]
        torch.testing.assert_close(torch.cat(parts), y_one, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st, one_state, atol=0, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_recurrent_matches_naive(bias: bool) -> None:
    x, w, b, state = _inputs([1, 1, 1])
    b = b if bias else None
    slots = torch.tensor([8, 1, 5])
    ref_state, got_state = state.clone(), state.clone()
    for step in range(5):
        xs = x + step
        y_ref = naive.causal_conv1d_varlen(xs, w, b, ref_state, _cu([1, 1, 1]), slots, "silu")
        y = recurrent.causal_conv1d_update(xs, got_state, w, b, slots, "silu")
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_state, ref_state, atol=0, rtol=0)


def test_bfloat16_inputs_match_fp32_maths() -> None:
    x, w, b, state = _inputs([5, 9])
    slots = torch.tensor([3, 1])
    st16 = state.to(torch.bfloat16)
    st32 = st16.float()
    y16 = chunk.causal_conv1d_varlen(x.bfloat16(), w.bfloat16(), b.bfloat16(), st16, _cu([5, 9]), slots, "silu")
    y32 = naive.causal_conv1d_varlen(
        x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float(), st32, _cu([5, 9]), slots, "silu"
    )
    assert y16.dtype == torch.bfloat16 and st16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(st16.float(), st32, atol=0, rtol=0)
