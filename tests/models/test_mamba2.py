"""Mamba-2 against transformers' Mamba2ForCausalLM (5.x), and the shared consistency checks."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.mamba2 import modeling_mamba2

from rnnserve.config import ModelConfig
from rnnserve.models import registry
from rnnserve.models.loader import load_model
from rnnserve.models.mamba2 import Mamba2LM
from tests.models import harness

if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(
        "Mamba-2 multi-token continuation from a cache is only exact in transformers 5.x", allow_module_level=True
    )

# Older transformers (4.x and 5.x up to at least 5.17) normalise the gated norm over all E channels;
# mamba_ssm and newer transformers normalise each group separately, which is what we implement.
# transformers 5.25 renamed the class MambaRMSNormGated -> Mamba2RMSNormGated.
_GATED_NORM = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
_GROUPED_NORM = "group_size" in inspect.signature(_GATED_NORM.__init__).parameters
needs_grouped_norm = pytest.mark.skipif(
    not _GROUPED_NORM, reason=f"transformers {transformers.__version__} has the ungrouped gated norm"
)

VOCAB = 203


def _config(n_groups: int, tied: bool, **overrides):
    # E = expand * hidden = 80 = 10 heads * 8; chunk_size 16 so HF's own chunked scan runs over several
    # chunks of the 300-token prompt.
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=40,
        expand=2,
        num_heads=10,
        head_dim=8,
        n_groups=n_groups,
        state_size=12,
        conv_kernel=4,
        num_hidden_layers=2,
        chunk_size=16,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return transformers.Mamba2Config(**kwargs)


def _load(folder: Path) -> Mamba2LM:
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch"))
    assert isinstance(loaded.model, Mamba2LM)
    return loaded.model


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def _all_logits(model: Mamba2LM, prompt: list[int]) -> torch.Tensor:
    states = harness.alloc_states(model, 2)
    batch = harness.prefill_batch([prompt], [1], [0], model.device, all_logits=True)
    return model.prefill(batch, states)


@pytest.fixture
def small_model(hf_model_dir) -> Mamba2LM:
    folder, _ = hf_model_dir(_config(2, tied=False), seed=3, jitter=0.05)
    return _load(folder)


@pytest.mark.parametrize(("n_groups", "tied"), [(1, True), (1, False), (2, True), (2, False)])
def test_matches_transformers(hf_model_dir, n_groups: int, tied: bool) -> None:
    """Full-sequence logits <= 1e-4 and 64 greedy tokens identical to transformers' generate."""
    if n_groups > 1 and not _GROUPED_NORM:
        pytest.skip(f"transformers {transformers.__version__} has the ungrouped gated norm")
    folder, ref = hf_model_dir(_config(n_groups, tied), seed=n_groups + 2 * tied, jitter=0.05)
    model = _load(folder)
    if tied:
        assert model.lm_head.weight is model.backbone.embeddings.weight
    prompt = _prompt(300, seed=n_groups)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(_all_logits(model, prompt), ref_logits, atol=1e-4, rtol=1e-4)

    short = prompt[:37]
    with torch.no_grad():
        ref_ids = ref.generate(
            torch.tensor([short]), max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0
        )[0, len(short) :].tolist()
    assert harness.greedy_generate(model, short, 64) == ref_ids
    assert harness.greedy_generate(model, short, 64, chunk=5) == ref_ids


@needs_grouped_norm
def test_biases_and_no_conv_bias(hf_model_dir) -> None:
    """use_bias (in_proj/out_proj biases), no conv bias, residual not in fp32: still the reference's logits."""
    cfg = _config(2, tied=False, use_bias=True, use_conv_bias=False, residual_in_fp32=False, conv_kernel=3)
    folder, ref = hf_model_dir(cfg, seed=8, jitter=0.05)
    model = _load(folder)
    assert model.backbone.layers[0].mixer.conv1d.bias is None
    prompt = _prompt(50, seed=6)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(_all_logits(model, prompt), ref_logits, atol=1e-4, rtol=1e-4)
    harness.check_chunked_prefill(model, prompt, chunk_sizes=(1, 4))


@needs_grouped_norm
def test_time_step_limit_clamps(hf_model_dir) -> None:
    """A binding time_step_limit clamps Δ as transformers' full-sequence forward does (its decode step
    ignores the limit, so only the full forward is a reference here); our decode clamps too, so chunked
    prefill and token-by-token still agree."""
    cfg = _config(2, tied=False, time_step_limit=(0.02, 0.06), time_step_min=0.001, time_step_max=0.2)
    folder, ref = hf_model_dir(cfg, seed=7, jitter=0.05)
    model = _load(folder)
    assert model.cfg.time_step_limit == (0.02, 0.06)
    prompt = _prompt(80, seed=5)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(_all_logits(model, prompt), ref_logits, atol=1e-4, rtol=1e-4)
    # The limit matters for this model: without it the logits differ.
    unclamped = transformers.Mamba2ForCausalLM(_config(2, tied=False)).eval()
    unclamped.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert not torch.allclose(unclamped(torch.tensor([prompt])).logits[0], ref_logits, atol=1e-3)
    harness.check_chunked_prefill(model, prompt[:40], chunk_sizes=(3, 64))


def test_default_time_step_limit_is_unbounded(hf_model_dir) -> None:
    folder, _ = hf_model_dir(_config(1, tied=True))
    assert _load(folder).cfg.time_step_limit == (0.0, math.inf)


def test_chunked_prefill(small_model: Mamba2LM) -> None:
    """Chunk sizes 1, 2, 3, 7, 64 and whole == one shot == token by token; 90 tokens span two
    kernel chunks of 64, and chunks of 1 and 2 end inside the conv window (K - 1 = 3)."""
    harness.check_chunked_prefill(small_model, _prompt(90, seed=11))


def test_batch_equals_alone(small_model: Mamba2LM) -> None:
    prompts = [_prompt(n, seed=n) for n in (1, 2, 70, 150, 5)]
    harness.check_batch_equals_alone(small_model, prompts)


def test_state_specs(small_model: Mamba2LM) -> None:
    cfg = small_model.cfg
    specs = small_model.state_specs()
    assert len(specs) == 2
    conv, ssm = specs[0]
    assert (conv.name, conv.shape, conv.dtype) == ("conv", (80 + 2 * 2 * 12, 3), torch.float32)
    assert (ssm.name, ssm.shape, ssm.dtype) == ("ssm", (cfg.num_heads, cfg.state_size, cfg.head_dim), torch.float32)


def test_registry_resolves_mamba2() -> None:
    assert registry.resolve_class({"architectures": ["Mamba2ForCausalLM"]}) is Mamba2LM
    assert registry.resolve_class({"model_type": "mamba2"}) is Mamba2LM


def test_mamba_ssm_embedding_name(hf_model_dir) -> None:
    """Original mamba_ssm checkpoints say ``backbone.embedding.weight``."""
    _, ref = hf_model_dir(_config(1, tied=False), seed=1)
    model = Mamba2LM.from_hf_config(ref.config.to_dict(), backend="torch")
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ref.state_dict().items()}
    filled = model.load_weights(sd.items())
    assert filled == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(model.backbone.embeddings.weight, ref.backbone.embeddings.weight)


def test_bad_config_rejected() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        Mamba2LM.from_hf_config(
            {
                "vocab_size": 10,
                "hidden_size": 8,
                "expand": 2,
                "num_heads": 4,
                "head_dim": 4,
                "n_groups": 3,
                "state_size": 4,
                "num_hidden_layers": 1,
            },
            backend="torch",
        )


def test_bf16_runs_with_fp32_ssm_state(hf_model_dir) -> None:
    """In bf16 the SSM state stays fp32, A/dt_bias/D stay exact, and logits stay near the fp32 ones."""
    folder, _ = hf_model_dir(_config(2, tied=False), seed=4, jitter=0.05)
    ref = _load(folder)
    model = load_model(ModelConfig(model=str(folder), dtype="bfloat16", device="cpu", kernels="torch")).model
    assert model.dtype == torch.bfloat16
    mixer = model.backbone.layers[0].mixer
    assert mixer.A.dtype == torch.float32
    torch.testing.assert_close(mixer.A, ref.backbone.layers[0].mixer.A)
    specs = model.state_specs()[0]
    assert [s.dtype for s in specs] == [torch.bfloat16, torch.float32]
    prompt = _prompt(40, seed=9)
    torch.testing.assert_close(_all_logits(model, prompt), _all_logits(ref, prompt), atol=0.1, rtol=0.1)
    harness.check_chunked_prefill(model, prompt, chunk_sizes=(7,), atol=0.05, rtol=0.05)
