"""selective_scan: chunk (prefill) and recurrent (decode) against the sequential reference."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.selective_scan import chunk, naive, recurrent


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu


def _inputs(T: int, E: int = 10, N: int = 6, S: int = 9, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    args = {
        "x": torch.randn(T, E, generator=g).to(dtype),
        "dt": (torch.randn(T, E, generator=g) - 1.0).to(dtype),
        "A": -torch.exp(torch.randn(E, N, generator=g)),
        "B": torch.randn(T, N, generator=g).to(dtype),
        "C": torch.randn(T, N, generator=g).to(dtype),
        "D": torch.randn(E, generator=g),
        "z": torch.randn(T, E, generator=g).to(dtype),
        "dt_bias": torch.randn(E, generator=g) * 0.5,
    }
    state = torch.randn(S, E, N, generator=g)
    return args, state


@pytest.mark.parametrize("lens", [[1], [63], [500], [5, 1, 2, 63, 3, 40], [2, 1]])
@pytest.mark.parametrize("chunk_size", [1, 4, 32])
def test_chunk_matches_naive_varlen(lens: list[int], chunk_size: int) -> None:
    args, state = _inputs(sum(lens))
    slots = torch.tensor([7, 2, 5, 3, 8, 6][: len(lens)], dtype=torch.long)
    ref_state, got_state = state.clone(), state.clone()
    y_ref = naive.selective_scan_varlen(**args, ssm_state=ref_state, cu_seqlens=_cu(lens), slot_ids=slots)
    y = chunk.selective_scan_varlen(
        **args, ssm_state=got_state, cu_seqlens=_cu(lens), slot_ids=slots, chunk_size=chunk_size
    )
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state, ref_state, atol=1e-4, rtol=1e-4)
    untouched = [s for s in range(state.shape[0]) if s not in slots.tolist()]
    torch.testing.assert_close(got_state[untouched], state[untouched], atol=0, rtol=0)


def test_many_blocks_and_strong_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks force the carry across blocks; huge Δ·|A| makes cumulative decays underflow to 0,
    which must give the right (fully decayed) answer, not inf or nan."""
    monkeypatch.setattr(chunk, "_BLOCK_ELEMENTS", 10 * 6 * 16)
    lens = [37, 70, 1, 12]
    args, state = _inputs(sum(lens))
    args["dt"] = args["dt"] * 20.0  # softplus(dt) up to ~100: exp(Δ A) underflows within a chunk
    slots = torch.tensor([4, 1, 8, 3])
    ref_state, got_state = state.clone(), state.clone()
    y_ref = naive.selective_scan_varlen(**args, ssm_state=ref_state, cu_seqlens=_cu(lens), slot_ids=slots)
    y = chunk.selective_scan_varlen(**args, ssm_state=got_state, cu_seqlens=_cu(lens), slot_ids=slots, chunk_size=8)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state, ref_state, atol=1e-4, rtol=1e-4)


def test_no_optional_inputs() -> None:
    lens = [9, 4]
    args, state = _inputs(sum(lens))
    for key in ("D", "z", "dt_bias"):
        args[key] = None
    slots = torch.tensor([3, 5])
    args["dt"] = args["dt"].abs()  # without softplus Δ must already be positive
    ref_state, got_state = state.clone(), state.clone()
    y_ref = naive.selective_scan_varlen(
        **args, ssm_state=ref_state, cu_seqlens=_cu(lens), slot_ids=slots, dt_softplus=False
    )
    y = chunk.selective_scan_varlen(
        **args, ssm_state=got_state, cu_seqlens=_cu(lens), slot_ids=slots, dt_softplus=False, chunk_size=4
    )
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state, ref_state, atol=1e-4, rtol=1e-4)


def test_split_prefill_equals_one_shot() -> None:
    """Resuming from the state a previous chunk left gives what one long call gives."""
    args, state = _inputs(50)
    one = state.clone()
    cu = _cu([50])
    y_one = chunk.selective_scan_varlen(**args, ssm_state=one, cu_seqlens=cu, slot_ids=torch.tensor([6]))
    for size in (1, 3, 7, 33):
        st = state.clone()
        parts = []
        for i in range(0, 50, size):
            part = {k: (v[i : i + size] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
            n = part["x"].shape[0]
            parts.append(
                chunk.selective_scan_varlen(**part, ssm_state=st, cu_seqlens=_cu([n]), slot_ids=torch.tensor([6]))
            )
        torch.testing.assert_close(torch.cat(parts), y_one, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(st, one, atol=1e-4, rtol=1e-4)


def test_recurrent_matches_naive() -> None:
    args, state = _inputs(3 * 6)
    slots = torch.tensor([8, 1, 5])
    ref_state, got_state = state.clone(), state.clone()
    for step in range(6):
        part = {k: (v[3 * step : 3 * step + 3] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
        y_ref = naive.selective_scan_varlen(**part, ssm_state=ref_state, cu_seqlens=_cu([1, 1, 1]), slot_ids=slots)
        y = recurrent.selective_state_update(got_state, **part, slot_ids=slots)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_state, ref_state, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_keep_fp32_state() -> None:
    lens = [20, 7]
    args, state = _inputs(sum(lens), dtype=torch.bfloat16)
    slots = torch.tensor([2, 6])
    ref_state, got_state = state.clone(), state.clone()
    y = chunk.selective_scan_varlen(**args, ssm_state=got_state, cu_seqlens=_cu(lens), slot_ids=slots)
    ref_args = {k: v.float() for k, v in args.items()}
    y_ref = naive.selective_scan_varlen(**ref_args, ssm_state=ref_state, cu_seqlens=_cu(lens), slot_ids=slots)
    assert y.dtype == torch.bfloat16 and got_state.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got_state, ref_state, atol=1e-4, rtol=1e-4)
