"""Continuous batching with real families (random weights, saved by transformers, loaded by our
loader): requests of prompt lengths 1..300 arriving at different steps, under a small token budget
that forces chunked prefill, each produce exactly the tokens they produce alone."""

from __future__ import annotations

import importlib.util

import pytest

from rnnserve.config import ModelConfig
from rnnserve.engine import SamplingParams
from rnnserve.models.loader import load_model
from tests.engine.test_engine import check_continuous_batching, run_alone
from tests.models.harness import greedy_generate


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def mamba_config():
    from transformers import MambaConfig

    return MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=200, state_size=8, expand=2, conv_kernel=4)


def mamba2_config():
    from transformers import Mamba2Config

    return Mamba2Config(
        hidden_size=64, num_hidden_layers=2, vocab_size=200, num_heads=8, head_dim=16, state_size=16, chunk_size=16
    )


FAMILIES = [
    pytest.param(
        "rnnserve.models.mamba",
        mamba_config,
        marks=pytest.mark.skipif(not _has("rnnserve.models.mamba"), reason="rnnserve.models.mamba not there yet"),
        id="mamba",
    ),
    pytest.param(
        "rnnserve.models.mamba2",
        mamba2_config,
        marks=pytest.mark.skipif(not _has("rnnserve.models.mamba2"), reason="rnnserve.models.mamba2 not there yet"),
        id="mamba2",
    ),
]


@pytest.mark.parametrize(("module", "make_config"), FAMILIES)
def test_continuous_batching_real_model(hf_model_dir, module, make_config):
    folder, _ = hf_model_dir(make_config(), jitter=0.02)
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu")).model
    # The engine alone agrees with plain prefill + greedy decode through the model interface.
    prompt = list(range(3, 40))
    assert run_alone(model, prompt, SamplingParams(max_tokens=8, temperature=0.0)) == greedy_generate(model, prompt, 8)
    check_continuous_batching(model, [1, 300, 7, 64, 2, 129, 3], gen=8, budget=48, slots=3)
