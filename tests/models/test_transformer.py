"""The Transformer baseline against transformers' LlamaForCausalLM / GPT2LMHeadModel (random tiny
weights saved in HF format and loaded through our loader), and the shared family checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rnnserve.config import ModelConfig
from rnnserve.models.loader import load_model
from rnnserve.models.transformer import TransformerLM
from tests.models import harness

VOCAB = 128


def _llama_config(max_len: int = 256) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: two query heads per KV head
        max_position_embeddings=max_len,
        initializer_range=0.2,  # peaked logits, so greedy ties cannot flip on rounding
        bos_token_id=1,
        eos_token_id=2,
    )


def _gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )


@torch.no_grad()
def _save(hf_model: torch.nn.Module, folder: Path) -> Path:
    # Jitter every weight so norm scales and biases (1 and 0 at init) are checked too.
    for p in hf_model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[torch.nn.Module, TransformerLM]:
    torch.manual_seed(0)
    ref = LlamaForCausalLM(_llama_config()).eval()
    folder = _save(ref, tmp_path_factory.mktemp("llama"))
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"))
    assert isinstance(loaded.model, TransformerLM)
    return ref, loaded.model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[torch.nn.Module, TransformerLM]:
    torch.manual_seed(1)
    ref = GPT2LMHeadModel(_gpt2_config()).eval()
    folder = _save(ref, tmp_path_factory.mktemp("gpt2"))
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"))
    assert isinstance(loaded.model, TransformerLM)
    return ref, loaded.model


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def _check_logits_and_greedy(ref: torch.nn.Module, ours: TransformerLM) -> None:
    prompt = _prompt(37)
    ref_logits = ref(torch.tensor([prompt])).logits[0].float()  # [T, V]
    states = harness.alloc_states(ours, 3)
    batch = harness.prefill_batch([prompt], [2], [0], ours.device, all_logits=True, states=states)
    logits = ours.prefill(batch, states)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)

    steps = 64
    ref_out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert harness.greedy_generate(ours, prompt, steps) == ref_out
    assert harness.greedy_generate(ours, prompt, steps, chunk=5) == ref_out


def test_llama_matches_transformers(llama) -> None:
    _check_logits_and_greedy(*llama)


def test_gpt2_matches_transformers(gpt2) -> None:
    _check_logits_and_greedy(*gpt2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunked_prefill_and_batching(family: str, request) -> None:
    _, model = request.getfixturevalue(family)
    harness.check_chunked_prefill(model, _prompt(23, seed=3), chunk_sizes=(1, 3, 7, 64))
    harness.check_batch_equals_alone(model, [_prompt(n, seed=n) for n in (1, 9, 30)])


def test_decode_batch_mixed_contexts(llama) -> None:
    """A decode batch whose sequences sit at very different positions (one past a block boundary,
    one inside its first block) attends each over its own blocks only, and writes each new key
    where the sequence alone writes it."""
    _, model = llama
    prompts = [_prompt(3, seed=5), _prompt(60, seed=6), _prompt(16, seed=7)]
    slots = [7, 4, 2]
    states = harness.alloc_states(model, 8)
    harness.prefill_in_chunks(model, states, prompts, slots, None)
    toks = [11, 12, 13]
    batch = harness.decode_batch(toks, [len(p) for p in prompts], slots, model.device, states)
    batched = model.decode(batch, states)
    k_batched = _cached_keys(states, slots, [len(p) + 1 for p in prompts])
    for i, p in enumerate(prompts):
        alone = harness.alloc_states(model, 2)
        harness.prefill_in_chunks(model, alone, [p], [1], None)
        one = harness.decode_one_by_one(model, alone, [toks[i]], 1, start=len(p))[0]
        torch.testing.assert_close(batched[i], one, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k_batched[i], _cached_keys(alone, [1], [len(p) + 1])[0], atol=1e-5, rtol=1e-5)


def _cached_keys(states, slots: list[int], lens: list[int]) -> list[torch.Tensor]:
    """Layer 0's cached keys [len, Hkv, hd] of each slot, read through its block table."""
    cache = states.kv_cache
    k_cache = cache.caches[0][0].flatten(0, 1)  # [NB * bs, Hkv, hd]
    out = []
    for slot, n in zip(slots, lens):
        table = cache.block_table(slot)
        rows = [table[p // cache.block_size] * cache.block_size + p % cache.block_size for p in range(n)]
        out.append(k_cache[rows])
    return out


def test_memory_per_sequence_is_what_it_uses(llama) -> None:
    """No per-slot state and no per-slot max_model_len buffer: a sequence holds ceil(len / block)
    blocks of keys and values of every layer, whatever --max-model-len is."""
    _, model = llama
    assert all(layer == [] for layer in model.state_specs())
    specs = model.kv_specs()
    assert len(specs) == 2 and specs[0].num_kv_heads == 2 and specs[0].head_dim == 16
    assert sum(s.bytes_per_token for s in specs) == 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x dims x fp32
    states = harness.alloc_states(model, 3)
    harness.prefill_in_chunks(model, states, [_prompt(37), _prompt(5, seed=1)], [1, 2], None)
    assert states.kv_cache.num_blocks_of(1) == 3 and states.kv_cache.num_blocks_of(2) == 1
    assert states.kv_cache.num_used_blocks == 4


def test_positions_past_max_model_len_are_refused(llama) -> None:
    _, model = llama
    full = model.max_model_len
    states = harness.alloc_states(model, 2)  # a cache sized for the full length
    try:
        model.limit_context(32)
        assert model.max_model_len == 32
        with pytest.raises(ValueError, match="max_model_len 32"):
            harness.prefill_in_chunks(model, states, [_prompt(40)], [1], None)
    finally:
        model.max_model_len = full


def test_served_max_model_len_sizes_the_kv_cache(tmp_path: Path) -> None:
    """Without --kv-cache-memory the engine's cache holds every slot at the served --max-model-len
    (a 512-position model served at 96 never allocates 512 positions per sequence); the state pool
    holds nothing for it."""
    from rnnserve.config import RunnerConfig, SchedulerConfig, StatePoolConfig
    from rnnserve.engine.engine import LLMEngine

    torch.manual_seed(0)
    folder = _save(LlamaForCausalLM(_llama_config(512)), tmp_path / "llama")
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"))
    engine = LLMEngine(
        loaded.model,
        StatePoolConfig(max_num_seqs=2),
        SchedulerConfig(max_model_len=96),
        RunnerConfig(enforce_eager=True),
        loaded.eos_token_id,
        model_max_len=loaded.max_model_len,
    )
    assert engine.max_model_len == 96
    assert engine.pool.bytes_per_slot == 0
    assert engine.kv_cache is not None
    assert engine.kv_cache.num_blocks == 2 * 6  # 2 slots x ceil(96 / 16)
    assert engine.kv_cache.bytes_per_block == 16 * 2 * 2 * 2 * 16 * 4  # tokens x layers x (k, v) x heads x dims x fp32


def test_unsupported_variants_are_clear_errors() -> None:
    cfg = _llama_config().to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        TransformerLM.from_hf_config(cfg, backend="torch")
    gpt2 = _gpt2_config().to_dict() | {"scale_attn_by_inverse_layer_idx": True}
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        TransformerLM.from_hf_config(gpt2, backend="torch")
