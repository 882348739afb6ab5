"""Paged attention (PyTorch prefill and decode) against dense causal attention: block boundaries,
sequences of 1, 15, 16, 17 and 500 tokens, varlen batches, GQA, and the cache they leave."""

from __future__ import annotations

import pytest
import torch

from rnnserve.kernels.paged_attention import (
    causal_attention_naive,
    paged_attention_decode,
    paged_attention_naive,
    paged_attention_prefill,
)
from tests.kernels.paged_cases import (
    DECODE_LENS,
    HEAD_SHAPES,
    PREFILL_CASES,
    check_cache,
    make_case,
    run_decode,
    run_prefill,
)

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}


def test_dense_reference_is_softmax_attention() -> None:
    """The reference itself, against an explicit loop: the last query of a 3-key sequence."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 2, 4, generator=g), torch.randn(3, 1, 4, generator=g), torch.randn(3, 1, 4, generator=g)
    o = causal_attention_naive(q, k, v, scale=0.5)
    for h in range(2):
        w = torch.softmax(k[:, 0] @ q[1, h] * 0.5, dim=0)
        torch.testing.assert_close(o[1, h], w @ v[:, 0])
        w0 = torch.softmax(k[:2, 0] @ q[0, h] * 0.5, dim=0)  # query 0 sits at position 1
        torch.testing.assert_close(o[0, h], w0 @ v[:2, 0])


@pytest.mark.parametrize(("prefix", "new"), PREFILL_CASES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), HEAD_SHAPES)
def test_prefill_matches_dense(prefix, new, heads, kv_heads, head_dim) -> None:
    case = make_case(prefix, new, heads, kv_heads, head_dim)
    before = case.k_cache.clone()
    out = run_prefill(paged_attention_prefill, case)
    torch.testing.assert_close(out, case.expected, **TOL[torch.float32])
    check_cache(case, before)


@pytest.mark.parametrize("lens", DECODE_LENS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), HEAD_SHAPES)
def test_decode_matches_dense(lens, heads, kv_heads, head_dim) -> None:
    case = make_case([n - 1 for n in lens], [1] * len(lens), heads, kv_heads, head_dim, seed=len(lens))
    before = case.k_cache.clone()
    out = run_decode(paged_attention_decode, case)
    torch.testing.assert_close(out, case.expected, **TOL[torch.float32])
    check_cache(case, before)


def test_block_size_that_is_not_a_power_of_two() -> None:
    case = make_case([0, 11, 4], [13, 1, 20], 4, 2, 8, block_size=5)
    out = run_prefill(paged_attention_prefill, case)
    torch.testing.assert_close(out, case.expected, **TOL[torch.float32])


def test_chunked_prefill_equals_one_shot() -> None:
    """A 70-token prompt prefilled in chunks of 1, 16 and 53 through the cache == one shot."""
    one = make_case([0], [70], 4, 2, 8, seed=3)
    out_one = paged_attention_prefill(
        one.q,
        one.k,
        one.v,
        one.k_cache,
        one.v_cache,
        one.cu_seqlens,
        one.seq_lens,
        one.block_tables,
        one.slot_mapping,
        one.scale,
        70,
        70,
    )
    chunked = make_case([0], [70], 4, 2, 8, seed=3)
    outs = []
    for lo, hi in [(0, 1), (1, 17), (17, 70)]:
        cu = torch.tensor([0, hi - lo], dtype=torch.int32)
        outs.append(
            paged_attention_prefill(
                chunked.q[lo:hi],
                chunked.k[lo:hi],
                chunked.v[lo:hi],
                chunked.k_cache,
                chunked.v_cache,
                cu,
                torch.tensor([hi], dtype=torch.int32),
                chunked.block_tables,
                chunked.slot_mapping[lo:hi],
                chunked.scale,
                hi - lo,
                hi,
            )
        )
    torch.testing.assert_close(torch.cat(outs), out_one, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked.k_cache, one.k_cache)


def test_naive_paged_reader_agrees() -> None:
    """The slow paged reader (Python lists over the block table) == the dense reference."""
    case = make_case([0, 16, 15], [5, 1, 17], 4, 2, 8)
    flat = case.k_cache.view(-1, *case.k_cache.shape[2:])
    flat[case.slot_mapping] = case.k
    case.v_cache.view(-1, *case.v_cache.shape[2:])[case.slot_mapping] = case.v
    out = paged_attention_naive(
        case.q, case.k_cache, case.v_cache, case.cu_seqlens, case.seq_lens, case.block_tables, case.scale
    )
    torch.testing.assert_close(out, case.expected, **TOL[torch.float32])


def test_bf16_inputs() -> None:
    case = make_case([0, 20], [33, 1], 4, 2, 16, dtype=torch.bfloat16)
    out = run_prefill(paged_attention_prefill, case)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), case.expected, **TOL[torch.bfloat16])


def test_gqa_head_count_mismatch_is_an_error() -> None:
    case = make_case([0], [3], 4, 2, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_attention_decode(
            case.q[:, :3],
            case.k,
            case.v,
            case.k_cache,
            case.v_cache,
            case.seq_lens,
            case.block_tables,
            case.slot_mapping,
            case.scale,
            case.max_seq_len,
        )


def test_gather_reuses_a_host_buffer_per_name_and_thread() -> None:
    """``gather_padded(..., reuse=name)`` equals a fresh gather, writes into the same buffer call
    after call (grown when a larger batch needs it, then reused for smaller ones), keeps "k" and "v"
    apart, and gives each thread its own buffers (each engine loop runs in its own thread)."""
    import threading

    from rnnserve.kernels.paged_attention.cache import gather_padded

    g = torch.Generator().manual_seed(0)
    cache = torch.randn(9, 4, 2, 3, generator=g)  # 8 real blocks of 4 tokens
    small, large = torch.tensor([[3, 1]], dtype=torch.int32), torch.tensor([[2, 5, 7], [8, 4, 6]], dtype=torch.int32)

    def gathered(tables: torch.Tensor, length: int, name: str) -> torch.Tensor:
        out = gather_padded(cache, tables, length, name)
        torch.testing.assert_close(out, gather_padded(cache, tables, length), atol=0, rtol=0)
        return out

    first = gathered(small, 6, "k")
    assert gathered(small, 5, "k").data_ptr() == first.data_ptr()
    grown = gathered(large, 11, "k")
    assert gathered(small, 6, "k").data_ptr() == grown.data_ptr()
    assert gathered(small, 6, "v").data_ptr() != grown.data_ptr()
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.append(gathered(large, 11, "k").data_ptr()))
    thread.start()
    thread.join()
    assert other and other[0] != grown.data_ptr()


def test_gather_buffer_made_under_inference_mode_serves_no_grad_callers() -> None:
    """The engine runs under inference_mode, the test harness under no_grad: a buffer the first
    made must still take the second's writes."""
    from rnnserve.kernels.paged_attention.cache import gather_padded

    cache, tables = torch.randn(5, 2, 1, 2), torch.tensor([[4, 2, 1, 3]], dtype=torch.int32)
    with torch.inference_mode():
        gather_padded(cache, tables, 8, "inference")
    with torch.no_grad():
        out = gather_padded(cache, tables, 7, "inference")
    torch.testing.assert_close(out, gather_padded(cache, tables, 7), atol=0, rtol=0)
