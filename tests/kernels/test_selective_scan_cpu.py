"""selective_scan.cpu (the C++ prefill scan) against the sequential reference and the chunked torch scan:
odd sizes, varlen batches with empty sequences, resumed states, strided views, the fallback."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.cpu_decode import unavailable_reason
from rnnserve.kernels.selective_scan import chunk, cpu, naive

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu


def _inputs(T: int, E: int, N: int, S: int = 9, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """x and z as the two halves of one [T, 2E] tensor and B, C as columns of one [T, R + 2N] tensor,
    the row-strided views the model passes."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(T, 2 * E, generator=g)
    dbc = torch.randn(T, 3 + 2 * N, generator=g)
    args = {
        "x": xz[:, :E],
        "dt": torch.randn(T, E, generator=g) - 1.0,
        "A": -torch.exp(torch.randn(E, N, generator=g)),
        "B": dbc[:, 3 : 3 + N],
        "C": dbc[:, 3 + N :],
        "D": torch.randn(E, generator=g),
        "z": xz[:, E:],
        "dt_bias": torch.randn(E, generator=g) * 0.5,
    }
    return args, torch.randn(S, E, N, generator=g)


@pytest.fixture(scope="module")
def ops():
    ops = cpu.load()
    if ops is None:
        pytest.skip("the CPU scan kernel did not build (see the warning)")
    return ops


@pytest.mark.parametrize("lens", [[1], [63], [500], [5, 0, 1, 2, 63, 3], [2, 1]])
@pytest.mark.parametrize(("E", "N"), [(10, 6), (64, 16), (133, 16), (24, 1)])
def test_matches_naive_varlen(ops, lens: list[int], E: int, N: int) -> None:
    args, state = _inputs(sum(lens), E, N)
    slots = torch.tensor([7, 2, 5, 3, 8, 6][: len(lens)], dtype=torch.long)
    ref_state, got_state = state.clone(), state.clone()
    y_ref = naive.selective_scan_varlen(**args, ssm_state=ref_state, cu_seqlens=_cu(lens), slot_ids=slots)
    y = cpu.selective_scan_varlen(
        **args, ssm_state=got_state, cu_seqlens=Varlen(_cu(lens), _cu(lens).tolist()), slot_ids=slots
    )
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state, ref_state, atol=1e-4, rtol=1e-4)
    untouched = [s for s in range(state.shape[0]) if s not in slots.tolist() or lens[slots.tolist().index(s)] == 0]
    torch.testing.assert_close(got_state[untouched], state[untouched], atol=0, rtol=0)


def test_equals_chunked_scan_at_model_shape(ops) -> None:
    """Mamba-130m's channel count and state size, two sequences resuming from random states."""
    lens = [300, 77]
    args, state = _inputs(sum(lens), 1536, 16, S=4)
    slots = torch.tensor([3, 1])
    ref_state, got_state = state.clone(), state.clone()
    y_ref = chunk.selective_scan_varlen(**args, ssm_state=ref_state, cu_seqlens=_cu(lens), slot_ids=slots)
    y = cpu.selective_scan_varlen(**args, ssm_state=got_state, cu_seqlens=_cu(lens), slot_ids=slots)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state, ref_state, atol=1e-4, rtol=1e-4)


def test_split_prefill_equals_one_shot(ops) -> None:
    """Resuming from the state a previous call left (a chunked prompt) gives what one call gives."""
    args, state = _inputs(50, 20, 5)
    one = state.clone()
    y_one = cpu.selective_scan_varlen(**args, ssm_state=one, cu_seqlens=_cu([50]), slot_ids=torch.tensor([6]))
    for size in (1, 7, 33):
        st = state.clone()
        parts = []
        for i in range(0, 50, size):
            part = {k: (v[i : i + size] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
            n = part["x"].shape[0]
            parts.append(
                cpu.selective_scan_varlen(**part, ssm_state=st, cu_seqlens=_cu([n]), slot_ids=torch.tensor([6]))
            )
        torch.testing.assert_close(torch.cat(parts), y_one, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st, one, atol=1e-5, rtol=1e-5)


def test_strong_decay_and_no_optional_inputs(ops) -> None:
    """Huge Δ·|A| (decays underflow to 0: finite, right answer); no D, z, dt_bias and no softplus."""
    lens = [37, 12]
    args, state = _inputs(sum(lens), 18, 6)
    slots = torch.tensor([4, 1])
    strong = dict(args, dt=args["dt"] * 20.0)
    ref_state, got_state = state.clone(), state.clone()
    y_ref = naive.selective_scan_varlen(**strong, ssm_state=ref_state, cu_seqlens=_cu(lens), slot_ids=slots)
    y = cpu.selective_scan_varlen(**strong, ssm_state=got_state, cu_seqlens=_cu(lens), slot_ids=slots)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state, ref_state, atol=1e-4, rtol=1e-4)

    bare = dict(args, D=None, z=None, dt_bias=None, dt=args["dt"].abs())
    ref_state, got_state = state.clone(), state.clone()
    kw = {"cu_seqlens": _cu(lens), "slot_ids": slots, "dt_softplus": False}
    y_ref = naive.selective_scan_varlen(**bare, ssm_state=ref_state, **kw)
    y = cpu.selective_scan_varlen(**bare, ssm_state=got_state, **kw)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state, ref_state, atol=1e-4, rtol=1e-4)


def test_other_dtypes_and_a_missing_build_use_the_torch_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = chunk.selective_scan_varlen
    monkeypatch.setattr(chunk, "selective_scan_varlen", lambda *a, **k: calls.append("chunk") or real(*a, **k))
    args, state = _inputs(9, 8, 4)
    bf16 = {k: (v.to(torch.bfloat16) if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
    y = cpu.selective_scan_varlen(**bf16, ssm_state=state.clone(), cu_seqlens=_cu([9]), slot_ids=torch.tensor([2]))
    assert y.dtype == torch.bfloat16 and calls == ["chunk"]
    monkeypatch.setattr(cpu, "ready", lambda: None)
    cpu.selective_scan_varlen(**args, ssm_state=state.clone(), cu_seqlens=_cu([9]), slot_ids=torch.tensor([2]))
    assert calls == ["chunk", "chunk"]
