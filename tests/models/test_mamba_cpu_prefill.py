"""Mamba and DenseMamba prefill through the C++ CPU conv, scan and projections (the prefill GEMM, with
the block's RMS norm and residual add fused; what the model runs on the CPU) equal the same model with
the torch chunk kernels and torch's projections: logits of every token within 1e-4 (absolute and
relative; float32, the two sum in different orders), final states within 1e-4 and greedy tokens equal,
for a varlen batch resumed from states a first chunk left, and a mixed decode + prefill step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from rnnserve.config import ModelConfig
from rnnserve.kernels.causal_conv1d import chunk as conv_chunk
from rnnserve.kernels.causal_conv1d import cpu as conv_cpu
from rnnserve.kernels.cpu_decode import unavailable_reason
from rnnserve.kernels.prefill_linear import cpu as gemm_cpu
from rnnserve.kernels.selective_scan import chunk as scan_chunk
from rnnserve.kernels.selective_scan import cpu as scan_cpu
from rnnserve.models.base import RecurrentLM
from rnnserve.models.loader import load_model
from tests.models import harness
from tests.models.test_dense_mamba import dense_folder

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")

VOCAB = 160


def _mixers(model: RecurrentLM) -> list[torch.nn.Module]:
    return [layer.mixer for layer in model.backbone.layers]


def _torch_kernels(model: RecurrentLM) -> RecurrentLM:
    for mixer in _mixers(model):
        mixer.conv_chunk = conv_chunk.causal_conv1d_varlen
        mixer.scan_chunk = scan_chunk.selective_scan_varlen
        mixer.prefill_linear = None
    return model


def _load(folder: Path) -> RecurrentLM:
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model


@pytest.fixture
def models(request, hf_model_dir, tmp_path: Path) -> tuple[RecurrentLM, RecurrentLM]:
    """(model with the kernels dispatch picks, the same weights with the torch chunk kernels)."""
    if scan_cpu.load() is None or conv_cpu.load() is None or gemm_cpu.load() is None:
        pytest.skip("the CPU prefill kernels did not build (see the warning)")
    if request.param == "mamba":
        # 133 inner channels: two full 64-channel blocks and a 5-channel tail; state 16 as in Mamba-130m.
        cfg = MambaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=133,
            num_hidden_layers=3,
            state_size=16,
            time_step_rank=5,
            tie_word_embeddings=False,
        )
        folder, _ = hf_model_dir(cfg, MambaForCausalLM, seed=0, jitter=0.05)
    else:
        folder, _, _ = dense_folder(tmp_path, m=2)
    fast = _load(folder)
    assert all(m.scan_chunk is scan_cpu.selective_scan_varlen for m in _mixers(fast))
    assert all(m.prefill_linear is gemm_cpu.linear_prefill for m in _mixers(fast))
    return fast, _torch_kernels(_load(folder))


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 89, (n,), generator=g).tolist()


@pytest.mark.parametrize("models", ["mamba", "dense_mamba"], indirect=True)
@torch.no_grad()
def test_varlen_resumed_prefill_equals_torch_kernels(models) -> None:
    fast, ref = models
    prompts = [_prompt(n, seed=n) for n in (1, 63, 200, 7)]
    harness.check_resumed_varlen_prefill(fast, ref, prompts, slots=[5, 2, 7, 3], split=40)


@pytest.mark.parametrize("models", ["mamba", "dense_mamba"], indirect=True)
def test_greedy_tokens_equal(models) -> None:
    fast, ref = models
    prompt = _prompt(150, seed=9)
    assert harness.greedy_generate(fast, prompt, 24) == harness.greedy_generate(ref, prompt, 24)
    assert harness.greedy_generate(fast, prompt, 24, chunk=37) == harness.greedy_generate(ref, prompt, 24)


@torch.no_grad()
def test_mixed_step_equals_torch_kernels(hf_model_dir) -> None:
    """One pass with 2 decode rows and 2 prompt chunks (Mamba's ``mixed``): the prompt rows go through
    the C++ conv and scan, the decode rows through the step kernels."""
    if scan_cpu.load() is None or conv_cpu.load() is None or gemm_cpu.load() is None:
        pytest.skip("the CPU prefill kernels did not build (see the warning)")
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2, state_size=16)
    folder, _ = hf_model_dir(cfg, MambaForCausalLM, seed=1, jitter=0.05)
    fast, ref = _load(folder), _torch_kernels(_load(folder))
    harness.check_mixed_step(fast, ref, [_prompt(30, 1), _prompt(5, 2), _prompt(70, 3), _prompt(2, 4)])


@torch.no_grad()
def test_every_projection_through_the_prefill_gemm(hf_model_dir) -> None:
    """in_proj (with the fused norm), x_proj, dt_proj and out_proj (adding into the residual) all
    take the GEMM, counted through a wrapper: a varlen batch (63, 500, 1 tokens) resumed in a second
    call equals torch's projections, logits and states."""
    if scan_cpu.load() is None or conv_cpu.load() is None or gemm_cpu.load() is None:
        pytest.skip("the CPU prefill kernels did not build (see the warning)")
    cfg = MambaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=288, num_hidden_layers=2, state_size=16, time_step_rank=9
    )
    folder, _ = hf_model_dir(cfg, MambaForCausalLM, seed=2, jitter=0.05)
    fast, ref = _load(folder), _torch_kernels(_load(folder))
    ran: list[tuple[int, int]] = []

    def counted(x, weight, bias=None, **kw):
        y = gemm_cpu.linear_prefill(x, weight, bias, **kw)
        if y is not None:
            ran.append(tuple(weight.shape))
        return y

    for mixer in _mixers(fast):
        mixer.prefill_linear = counted
    prompts = [_prompt(n, seed=n) for n in (63, 500, 1)]
    slots = [4, 1, 6]
    got, want = harness.alloc_states(fast, 8), harness.alloc_states(ref, 8)
    for states, model in ((got, fast), (want, ref)):
        model.prefill(harness.prefill_batch([p[:30] for p in prompts], slots, [0] * 3, model.device), states)
    seqs = [p[30:] for p in prompts[:2]]
    a = fast.prefill(harness.prefill_batch(seqs, slots[:2], [30, 30], fast.device, all_logits=True), got)
    b = ref.prefill(harness.prefill_batch(seqs, slots[:2], [30, 30], ref.device, all_logits=True), want)
    # Second call (503 rows) through the GEMM for each layer's in_proj, x_proj, dt_proj, out_proj; the
    # first (61 rows) below its row floor.
    assert sorted(set(ran)) == sorted({(576, 256), (41, 288), (288, 9), (256, 288)}) and len(ran) == 4 * 2
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    harness.assert_states_close(got, want, atol=1e-4, rtol=1e-4)
