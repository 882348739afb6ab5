"""Triton paged attention (varlen prefill, decode) against dense causal attention, on the cases the
PyTorch kernels run. Runs natively on CUDA, in a child process under TRITON_INTERPRET=1 on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.paged_cases import (
    DECODE_LENS,
    HEAD_SHAPES,
    PREFILL_CASES,
    check_cache,
    make_case,
    run_decode,
    run_prefill,
)
from tests.kernels.triton_util import import_triton_module, run_module_under_interpreter, triton_device

DEV = triton_device()
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 5e-3, "rtol": 5e-3}}


def test_under_triton_interpreter() -> None:
    run_module_under_interpreter(__file__)


@pytest.fixture(scope="module")
def kernels():
    prefill = import_triton_module("rnnserve.kernels.paged_attention.prefill_triton")
    decode = import_triton_module("rnnserve.kernels.paged_attention.decode_triton")
    return prefill.paged_attention_prefill, decode.paged_attention_decode


@pytest.mark.parametrize(("prefix", "new"), PREFILL_CASES)
def test_prefill_matches_dense(kernels, prefix, new) -> None:
    heads, kv_heads, head_dim = HEAD_SHAPES[len(prefix) % len(HEAD_SHAPES)]
    case = make_case(prefix, new, heads, kv_heads, head_dim, device=DEV)
    before = case.k_cache.clone()
    out = run_prefill(kernels[0], case)
    torch.testing.assert_close(out.cpu(), case.expected, **TOL[torch.float32])
    check_cache(case, before)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), HEAD_SHAPES)
def test_prefill_gqa_varlen_block_size_8(kernels, heads, kv_heads, head_dim) -> None:
    case = make_case([0, 8, 23], [9, 17, 1], heads, kv_heads, head_dim, block_size=8, device=DEV, seed=1)
    torch.testing.assert_close(run_prefill(kernels[0], case).cpu(), case.expected, **TOL[torch.float32])


@pytest.mark.parametrize("lens", DECODE_LENS)
def test_decode_matches_dense(kernels, lens) -> None:
    heads, kv_heads, head_dim = HEAD_SHAPES[len(lens) % len(HEAD_SHAPES)]
    case = make_case([n - 1 for n in lens], [1] * len(lens), heads, kv_heads, head_dim, device=DEV, seed=2)
    before = case.k_cache.clone()
    out = run_decode(kernels[1], case)
    torch.testing.assert_close(out.cpu(), case.expected, **TOL[torch.float32])
    check_cache(case, before)


@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision(kernels, dtype) -> None:
    case = make_case([0, 20], [33, 1], 4, 2, 16, dtype=dtype, device=DEV)
    torch.testing.assert_close(run_prefill(kernels[0], case).float().cpu(), case.expected, **TOL[dtype])
    dec = make_case([20, 3], [1, 1], 4, 2, 16, dtype=dtype, device=DEV)
    torch.testing.assert_close(run_decode(kernels[1], dec).float().cpu(), dec.expected, **TOL[dtype])


def test_decode_padding_rows_touch_only_the_padding_block(kernels) -> None:
    """CUDA-graph padding rows (block table of block 0, seq_len 1, slot mapping into block 0) leave
    the real rows' outputs and every real block unchanged."""
    alone = make_case([14, 30], [1, 1], 4, 2, 8, device=DEV, seed=4)
    padded = make_case([14, 30], [1, 1], 4, 2, 8, device=DEV, seed=4)
    out_alone = run_decode(kernels[1], alone)

    def cat(t: torch.Tensor, fill: float) -> torch.Tensor:  # three padding rows after the real two
        return torch.cat([t, torch.full((3, *t.shape[1:]), fill, dtype=t.dtype, device=DEV)])

    out = kernels[1](
        cat(padded.q, 0.5),
        cat(padded.k, 0.5),
        cat(padded.v, 0.5),
        padded.k_cache,
        padded.v_cache,
        cat(padded.seq_lens, 1),
        cat(padded.block_tables, 0),
        cat(padded.slot_mapping, 0),
        padded.scale,
        31,
    )
    torch.testing.assert_close(out[:2], out_alone, atol=0, rtol=0)
    assert torch.equal(padded.k_cache[1:], alone.k_cache[1:])
    assert torch.equal(padded.k_cache[0, 1:], alone.k_cache[0, 1:])  # padding wrote row 0 of block 0 only
