"""The Transformer baseline against transformers' LlamaForCausalLM / GPT2LMHeadModel (random tiny
weights saved in HF format and loaded through our loader), and the shared family checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rnnserve.config import ModelConfig
from rnnserve.models.base import DecodeBatch
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
    batch = harness.prefill_batch([prompt], [2], [0], ours.device, all_logits=True)
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


@pytest.mark.parametrize("attention", ["per_seq", "batched"])
def test_decode_batch_mixed_contexts(llama, attention: str) -> None:
    """A decode batch whose sequences sit at very different positions attends each over its own
    prefix only, in both decode attention paths (per-sequence views, batched gathered window)."""
    _, model = llama
    prompts = [_prompt(3, seed=5), _prompt(60, seed=6), _prompt(17, seed=7)]
    slots = [7, 4, 2]
    states = harness.alloc_states(model, 8)
    harness.prefill_in_chunks(model, states, prompts, slots, None)
    toks = torch.tensor([11, 12, 13])
    try:
        model.decode_attention = attention
        batched = model.decode(
            DecodeBatch(input_ids=toks, positions=torch.tensor([3, 60, 17]), slot_ids=torch.tensor(slots)), states
        )
    finally:
        model.decode_attention = "auto"
    for i, p in enumerate(prompts):
        alone = harness.alloc_states(model, 2)
        harness.prefill_in_chunks(model, alone, [p], [1], None)
        one = harness.decode_one_by_one(model, alone, [int(toks[i])], 1, start=len(p))[0]
        torch.testing.assert_close(batched[i], one, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(states[0]["k"][slots[i], : len(p) + 1], alone[0]["k"][1, : len(p) + 1])


def test_kv_cache_bytes_grow_with_max_model_len(tmp_path: Path) -> None:
    sizes = {}
    for max_len in (128, 512):
        torch.manual_seed(0)
        folder = _save(LlamaForCausalLM(_llama_config(max_len)), tmp_path / str(max_len))
        loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"))
        assert loaded.max_model_len == max_len
        specs = loaded.model.state_specs()
        assert [s.name for s in specs[0]] == ["k", "v"]
        assert specs[0][0].shape == (max_len, 2, 16)
        sizes[max_len] = sum(s.nbytes for layer in specs for s in layer)
    # 2 layers x (k, v) x L x 2 kv heads x 16 dims x 4 bytes
    assert sizes[128] == 2 * 2 * 128 * 2 * 16 * 4
    assert sizes[512] == 4 * sizes[128]


def test_lowering_max_model_len_shrinks_the_cache_and_bounds_positions(llama) -> None:
    _, model = llama
    full = model.max_model_len
    try:
        model.max_model_len = 32
        assert model.state_specs()[0][0].shape[0] == 32
        states = harness.alloc_states(model, 2)
        with pytest.raises(ValueError, match="max_model_len"):
            harness.prefill_in_chunks(model, states, [_prompt(40)], [1], None)
    finally:
        model.max_model_len = full


def test_served_max_model_len_sizes_the_pool(tmp_path: Path) -> None:
    """--max-model-len below the checkpoint's limit shrinks every slot's KV cache (a 128k-position
    model served at 4k must not allocate 128k positions per sequence)."""
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
    assert engine.pool.bytes_per_slot == 2 * 2 * 96 * 2 * 16 * 4  # layers x (k, v) x 96 x kv heads x dims x fp32


def test_unsupported_variants_are_clear_errors() -> None:
    cfg = _llama_config().to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        TransformerLM.from_hf_config(cfg, backend="torch")
    gpt2 = _gpt2_config().to_dict() | {"scale_attn_by_inverse_layer_idx": True}
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        TransformerLM.from_hf_config(gpt2, backend="torch")
