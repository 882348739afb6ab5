"""``--cpu-decode fused`` for the LLaMA-layout Transformer baseline equals the torch decode (the reference):
logits within 1e-4 of the largest logit (measured 4e-7), the same greedy tokens, and the same keys and values appended
to the paged KV cache (1e-5), over many steps after a chunked prefill (sequences of 1-13 prompt tokens
crossing blocks of 4 as they grow), at batch 1, 3 and 33 on out-of-order slots. Two shapes: GQA with
odd sizes (hidden 44, head_dim 10, intermediate 52, vocab 101, biases on attention and MLP, untied
head) and plain multi-head attention (head_dim 16, a tied head). The same with ``--quantization int8``
(int8 weights, fp32 activations) against the dequantized weights. Also: the runner picks the fused
decoder when asked, and the torch path, with a log line, where it cannot serve (GPT-2, no build).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from rnnserve.config import KVCacheConfig, ModelConfig, RunnerConfig, StatePoolConfig
from rnnserve.engine import cpu_decode as engine_cpu_decode
from rnnserve.engine.cpu_decode import fused_decoder
from rnnserve.engine.cpu_decode_transformer import FusedTransformerDecoder
from rnnserve.engine.kv_cache import KVCache
from rnnserve.engine.runner import ModelRunner
from rnnserve.engine.state_pool import StatePool
from rnnserve.kernels import cpu_decode
from rnnserve.models.base import DecodeBatch, PrefillBatch
from rnnserve.models.layers import Int8Linear
from rnnserve.models.loader import load_model
from rnnserve.models.transformer import TransformerLM

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")

NUM_SLOTS = 40
BLOCK = 4
VOCAB = 101
# Each step's slots: batch 1, 3 and 33, out of order; every sequence decodes many steps in all.
STEPS = [[7], [30, 2, 11], list(range(39, 6, -1)), [2, 39, 7], [5], *[list(range(1, 34))] * 6, [33, 1, 20]]


def _load(folder) -> TransformerLM:
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    assert isinstance(model, TransformerLM)
    return model


def _save_llama(folder, **kw):
    from transformers import LlamaConfig

    from tests.conftest import build_random_hf_model

    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **kw)
    build_random_hf_model(cfg, jitter=0.05).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    # GQA (4 query heads per KV head pair), head_dim 10 (vector tails in the attention), hidden 44 and
    # intermediate 52 (GEMM tails), biases on every projection, an untied head.
    return _save_llama(
        tmp_path_factory.mktemp("llama_gqa"),
        hidden_size=44,
        intermediate_size=52,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=10,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory):
    return _save_llama(
        tmp_path_factory.mktemp("llama_mha"),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )


def _cache(model: TransformerLM) -> KVCache:
    return KVCache(model.kv_specs(), KVCacheConfig(block_size=BLOCK), NUM_SLOTS, model.max_model_len, "cpu")


def _prefill(model: TransformerLM, cache: KVCache) -> dict[int, int]:
    """Slots 1..39 hold prompts of 1-13 tokens, prefilled in chunks of 3 through the torch path; the
    number of tokens each slot holds."""
    slots = list(range(1, NUM_SLOTS))
    prompts = {s: [3 + (s * 7 + i) % 90 for i in range(1 + s % 13)] for s in slots}
    for start in range(0, 13, 3):
        live = [s for s in slots if start < len(prompts[s])]
        chunks = [prompts[s][start : start + 3] for s in live]
        for s, c in zip(live, chunks):
            assert cache.allocate(s, start + len(c))
        cu = [0]
        for c in chunks:
            cu.append(cu[-1] + len(c))
        batch = PrefillBatch(
            input_ids=torch.tensor([t for c in chunks for t in c]),
            positions=torch.tensor([start + i for c in chunks for i in range(len(c))]),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            slot_ids=torch.tensor(live),
            logits_indices=torch.tensor(cu[1:]) - 1,
            cu_seqlens_cpu=tuple(cu),
            kv=cache.metadata(live, [start + len(c) for c in chunks], [len(c) for c in chunks]),
        )
        model.prefill(batch, [])
    return {s: len(p) for s, p in prompts.items()}


def _decode_batch(cache: KVCache, slots: list[int], tokens: list[int], lens: dict[int, int]) -> DecodeBatch:
    for s in slots:
        assert cache.allocate(s, lens[s] + 1)
    return DecodeBatch(
        input_ids=torch.tensor(tokens),
        positions=torch.tensor([lens[s] for s in slots]),
        slot_ids=torch.tensor(slots),
        kv=cache.metadata(slots, [lens[s] + 1 for s in slots], [1] * len(slots)),
    )


def _run_both(
    ref_model: TransformerLM, fused_model: TransformerLM, atol: float, same_cache: bool = True
) -> tuple[int, int]:
    """Prefill both caches alike (through ``ref_model``), then every step of STEPS through the torch
    decode of ``ref_model`` and the fused decode of ``fused_model``, feeding back the reference's greedy
    tokens. Asserts the logits within ``atol`` of the largest and, with ``same_cache``, the caches
    within 1e-5; returns (rows whose greedy token agreed, rows)."""
    ref_cache, fused_cache = _cache(ref_model), _cache(fused_model)
    lens = _prefill(ref_model, ref_cache)
    assert _prefill(ref_model, fused_cache) == lens  # the same prompt keys and values in both caches
    fused = fused_decoder(fused_model, [])
    assert isinstance(fused, FusedTransformerDecoder)
    next_token = {s: 5 + s for s in range(NUM_SLOTS)}
    agree = rows = 0
    for slots in STEPS:
        tokens = [next_token[s] for s in slots]
        ref = ref_model.decode(_decode_batch(ref_cache, slots, tokens, lens), [])
        got = fused(_decode_batch(fused_cache, slots, tokens, lens))
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=atol * float(ref.abs().max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        rows += len(slots)
        for s, row in zip(slots, ref):
            next_token[s] = int(row.argmax())
            lens[s] += 1
    assert max(lens.values()) > 3 * BLOCK  # the decode crossed blocks
    for (rk, rv), (fk, fv) in zip(ref_cache.caches, fused_cache.caches) if same_cache else ():
        torch.testing.assert_close(fk, rk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fv, rv, rtol=1e-5, atol=1e-5)
    return agree, rows


@pytest.mark.parametrize("shape", ["gqa", "mha"])
@torch.inference_mode()
def test_fused_decode_equals_torch(shape: str, request) -> None:
    model = _load(request.getfixturevalue(f"{shape}_dir"))
    agree, rows = _run_both(model, model, atol=1e-4)
    assert agree == rows


def _dequantized(folder) -> TransformerLM:
    """The float32 model whose projections and head hold the int8 model's dequantized weights (q * scale):
    what the fused int8 step computes, as it keeps the activations in fp32. The head is untied (the int8
    model looks tokens up in the fp32 embedding)."""
    ref, q = _load(folder), _load(folder)
    q.quantize_int8()
    with torch.no_grad():
        for lr, lq in zip(ref.layers, q.layers):
            for part in ("self_attn", "mlp"):
                for name, src in getattr(lq, part).named_children():
                    if isinstance(src, Int8Linear):
                        getattr(getattr(lr, part), name).weight.copy_(src.qweight.float() * src.scale[:, None])
        head = nn.Linear(q.lm_head.in_features, q.lm_head.out_features, bias=False)
        head.weight.data = q.lm_head.qweight.float() * q.lm_head.scale[:, None]
    ref.lm_head = head
    return ref


@pytest.mark.parametrize("shape", ["gqa", "mha"])
@torch.inference_mode()
def test_fused_int8_decode(shape: str, request) -> None:
    """``--quantization int8`` with ``--cpu-decode fused``: int8 panels, fp32 activations and KV cache.
    Against the torch decode of the dequantized weights: logits within 1e-4 of the largest, the same
    greedy tokens, the same cache."""
    folder = request.getfixturevalue(f"{shape}_dir")
    int8 = _load(folder)
    int8.quantize_int8()
    assert all(isinstance(m, Int8Linear) for m in (int8.layers[0].self_attn.q_proj, int8.layers[0].mlp.down_proj))
    agree, rows = _run_both(_dequantized(folder), int8, atol=1e-4)
    assert agree == rows


@torch.inference_mode()
def test_fused_int8_against_float32(gqa_dir) -> None:
    """The fused int8 step against the float32 torch decode: logits within 3% of the largest logit
    (measured 1.2%: per-channel int8 on these tiny layers, K = 40-52, where rounding errors average out
    least), the same greedy token in at least 90% of rows (measured all: random weights leave near ties)."""
    int8 = _load(gqa_dir)
    int8.quantize_int8()
    agree, rows = _run_both(_load(gqa_dir), int8, atol=0.03, same_cache=False)
    assert agree >= 0.9 * rows


@torch.inference_mode()
def test_fused_decode_refuses_a_bad_block_table(mha_dir) -> None:
    model = _load(mha_dir)
    cache = _cache(model)
    lens = _prefill(model, cache)
    batch = _decode_batch(cache, [3], [5], lens)
    batch.kv.block_tables[0, 0] = cache.num_blocks + 1  # past the cache's last block
    with pytest.raises(RuntimeError, match="out of range"):
        fused_decoder(model, [])(batch)


def _runner(model: TransformerLM, choice: str) -> ModelRunner:
    pool = StatePool(model.state_specs(), StatePoolConfig(max_num_seqs=4), torch.device("cpu"))
    cache = KVCache(model.kv_specs(), KVCacheConfig(block_size=BLOCK), pool.capacity, model.max_model_len, "cpu")
    return ModelRunner(model, pool, RunnerConfig(cpu_decode=choice), kv_cache=cache)


def test_runner_picks_fused_and_falls_back(mha_dir, tmp_path, monkeypatch, caplog) -> None:
    from transformers import GPT2Config

    from tests.conftest import build_random_hf_model

    model = _load(mha_dir)
    assert isinstance(_runner(model, "fused")._decoder, FusedTransformerDecoder)
    assert not isinstance(_runner(model, "torch")._decoder, FusedTransformerDecoder)
    gpt2 = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    build_random_hf_model(gpt2).save_pretrained(tmp_path / "gpt2")
    with caplog.at_level(logging.WARNING):
        runner = _runner(_load(tmp_path / "gpt2"), "fused")
    assert not isinstance(runner._decoder, FusedTransformerDecoder)
    assert "runs the LLaMA layout (not gpt2)" in caplog.text
    # A failed build (no compiler) leaves the torch path.
    monkeypatch.setattr(engine_cpu_decode.cpu_decode_transformer_kernels, "load", lambda: None)
    assert not isinstance(_runner(model, "fused")._decoder, FusedTransformerDecoder)
