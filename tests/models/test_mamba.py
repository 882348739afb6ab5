"""Our Mamba against transformers' MambaForCausalLM (random weights, float32, through our loader),
and the shared family checks (chunked prefill, batch == alone)."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from rnnserve.config import ModelConfig
from rnnserve.models.loader import load_model
from rnnserve.models.mamba import MambaLM
from tests.models import harness

VOCAB = 160


def tiny_config(**overrides) -> MambaConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        conv_kernel=4,
        expand=2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    kw.update(overrides)
    return MambaConfig(**kw)


@pytest.fixture
def pair(hf_model_dir) -> tuple[MambaLM, MambaForCausalLM]:
    """(our model loaded from the saved folder, transformers' reference), float32. The head is untied:
    a tied random model greedily repeats its input token forever, which would make the generation
    comparison trivial; this one produces varied tokens (tied heads are tested in test_loader)."""
    folder, ref = hf_model_dir(tiny_config(tie_word_embeddings=False), MambaForCausalLM, seed=0, jitter=0.05)
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    assert isinstance(model, MambaLM)
    return model, ref


def _prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def test_full_sequence_logits_match_transformers(pair) -> None:
    model, ref = pair
    prompts = [_prompt(45, seed=2), _prompt(3, seed=3), _prompt(20, seed=4)]
    states = harness.alloc_states(model, 8)
    batch = harness.prefill_batch(prompts, [5, 2, 7], [0, 0, 0], model.device, all_logits=True)
    logits = model.prefill(batch, states)  # [T, V], every token of every prompt
    expected = torch.cat([ref(torch.tensor([p]), use_cache=False).logits[0] for p in prompts])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt_len", [1, 2, 3, 17, 300])
@torch.no_grad()
def test_greedy_matches_transformers_generate(pair, prompt_len: int) -> None:
    model, ref = pair
    prompt = _prompt(prompt_len, seed=prompt_len)
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=64, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0
    )
    expected = out[0, prompt_len:].tolist()
    assert len(expected) == 64 and len(set(expected)) > 16  # a real sequence, not one token repeated
    assert harness.greedy_generate(model, prompt, 64) == expected
    # Chunked prefill of the prompt ends in the same state: same continuation.
    assert harness.greedy_generate(model, prompt, 64, chunk=2) == expected


def test_chunked_prefill_equals_one_shot_and_decode(pair) -> None:
    model, _ = pair
    harness.check_chunked_prefill(model, _prompt(90, seed=5), chunk_sizes=(1, 2, 3, 7, 64, 90))


def test_batch_equals_alone(pair) -> None:
    model, _ = pair
    harness.check_batch_equals_alone(model, [_prompt(n, seed=n) for n in (1, 2, 5, 37, 70)])


def test_state_specs(pair) -> None:
    model, _ = pair
    specs = model.state_specs()
    assert len(specs) == 2
    conv, ssm = specs[0]
    assert (conv.name, conv.shape, conv.dtype) == ("conv", (64, 3), torch.float32)
    assert (ssm.name, ssm.shape, ssm.dtype) == ("ssm", (64, 8), torch.float32)


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_bias": True, "use_conv_bias": False, "time_step_rank": 5, "residual_in_fp32": False},
        {"conv_kernel": 2, "expand": 3, "state_size": 3, "tie_word_embeddings": False},
    ],
)
@torch.no_grad()
def test_config_variants_match_transformers(hf_model_dir, overrides: dict) -> None:
    folder, ref = hf_model_dir(tiny_config(**overrides), MambaForCausalLM, seed=3, jitter=0.05)
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    prompt = _prompt(30, seed=9)
    states = harness.alloc_states(model, 3)
    logits = model.prefill(harness.prefill_batch([prompt], [2], [0], model.device, all_logits=True), states)
    torch.testing.assert_close(logits, ref(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=1e-4)
    harness.check_chunked_prefill(model, prompt, chunk_sizes=(1, 7))
