"""Mamba-2 prefill through the C++ SSD kernel and the C++ prefill GEMM (what the mixer takes on the CPU)
against the same model with the torch chunked scan and F.linear: logits of every token and final states within 1e-4,
greedy tokens equal, for odd lengths, a varlen batch resumed from states a first chunk left, and a
mixed decode + prefill step."""

from __future__ import annotations

import pytest
import torch
import transformers

from rnnserve.config import ModelConfig
from rnnserve.kernels.linear_recurrence import cpu as ssd_cpu
from rnnserve.models.loader import load_model
from rnnserve.models.mamba2 import Mamba2LM
from tests.models import harness

pytestmark = pytest.mark.skipif(ssd_cpu.load() is None, reason="the CPU SSD kernel needs AVX-512 and a compiler")

VOCAB = 160


def _config() -> transformers.Mamba2Config:
    # E = 2 * 64 = 4 heads of 32 (two groups of 2 heads), state 24: the kernel's masked column tails.
    return transformers.Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        expand=2,
        num_heads=4,
        head_dim=32,
        n_groups=2,
        state_size=24,
        conv_kernel=4,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _load(folder) -> Mamba2LM:
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    assert isinstance(model, Mamba2LM)
    return model


def _torch_scan(model: Mamba2LM) -> Mamba2LM:
    """The reference: the torch SSD scan and torch's F.linear for every projection."""
    for layer in model.backbone.layers:
        layer.mixer.ssd_chunk = ssd_cpu.ssd_varlen_torch
        layer.mixer.prefill_linear = None
    return model


@pytest.fixture
def models(hf_model_dir) -> tuple[Mamba2LM, Mamba2LM]:
    """(the model as the CPU prefill runs it, the same weights with the torch scan and nn.Linear)."""
    folder, _ = hf_model_dir(_config(), seed=0, jitter=0.05)
    fast = _load(folder)
    assert all(layer.mixer.ssd_chunk is ssd_cpu.ssd_varlen for layer in fast.backbone.layers)
    return fast, _torch_scan(_load(folder))


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@pytest.mark.parametrize("n", [1, 63, 500])
@torch.no_grad()
def test_one_prompt_equals_torch_scan(models, n: int) -> None:
    fast, ref = models
    got, want = harness.alloc_states(fast, 3), harness.alloc_states(ref, 3)
    a = fast.prefill(harness.prefill_batch([_prompt(n, n)], [2], [0], fast.device, all_logits=True), got)
    b = ref.prefill(harness.prefill_batch([_prompt(n, n)], [2], [0], ref.device, all_logits=True), want)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    harness.assert_states_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_varlen_resumed_prefill_equals_torch_scan(models) -> None:
    fast, ref = models
    prompts = [_prompt(n, seed=n) for n in (1, 63, 200, 7)]
    harness.check_resumed_varlen_prefill(fast, ref, prompts, slots=[5, 2, 7, 3], split=40)


def test_greedy_tokens_equal(models) -> None:
    fast, ref = models
    prompt = _prompt(150, seed=9)
    assert harness.greedy_generate(fast, prompt, 16) == harness.greedy_generate(ref, prompt, 16)
    assert harness.greedy_generate(fast, prompt, 16, chunk=37) == harness.greedy_generate(ref, prompt, 16)


@torch.no_grad()
def test_mixed_step_equals_torch_scan(models) -> None:
    """2 decode rows and 2 prompt chunks in one pass: the prompt rows through the kernel."""
    fast, ref = models
    harness.check_mixed_step(fast, ref, [_prompt(30, 1), _prompt(5, 2), _prompt(70, 3), _prompt(2, 4)])
