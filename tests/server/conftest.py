"""A servable folder (tiny random Mamba + the NeoX tokenizer + a chat template) and apps around it.

The model is transformers' MambaForCausalLM with random weights (hidden 64, 2 layers), its vocab
padded past the tokenizer's 50277 entries, saved with ``save_pretrained`` and loaded through our
loader by the real engine, exactly as ``rnnserve serve --model DIR`` does.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.config import (
    ModelConfig,
    PrefixCacheConfig,
    RunnerConfig,
    SchedulerConfig,
    ServerConfig,
    StatePoolConfig,
)
from tests.conftest import build_random_hf_model

VOCAB = 50280
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_model_dir(folder: Path, tokenizer_dir: Path | None, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    from transformers import MambaConfig

    config = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,  # a tied random head keeps repeating the last token
    )
    model = build_random_hf_model(config, seed=0)
    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
        if chat_template is not None:
            (folder / "chat_template.jinja").write_text(chat_template)
    return folder


@pytest.fixture(scope="session")
def model_dir(neox_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("served") / "tiny-mamba", neox_tokenizer_dir)


@pytest.fixture(scope="session")
def bare_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of model with no tokenizer files at all."""
    return build_model_dir(tmp_path_factory.mktemp("bare") / "bare-mamba", None)


def make_app(
    model_dir: Path,
    *,
    server: ServerConfig | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int = 8,
    chat_template: str | None = None,
    tokenizer: str | None = None,
    name: str = "tiny-mamba",
    prefix_cache: PrefixCacheConfig | None = None,
    state_dir: str | None = None,
):
    from rnnserve.engine.engine import AsyncEngine
    from rnnserve.server.app import build_app
    from rnnserve.server.tokenizer import load_tokenizer

    engine = AsyncEngine.from_configs(
        ModelConfig(model=str(model_dir), dtype="float32", device="cpu"),
        StatePoolConfig(max_num_seqs=max_num_seqs),
        SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=max_num_seqs, max_model_len=max_model_len),
        RunnerConfig(enforce_eager=True),
        prefix_cache_config=prefix_cache,
        state_dir=state_dir,
    )
    tok = load_tokenizer(model_dir, tokenizer, chat_template)
    return build_app(engine, tok, model_name=name, model_root=str(model_dir), server_config=server)


@pytest.fixture(scope="module")
def app_client(model_dir: Path) -> Iterator:
    from fastapi.testclient import TestClient

    with TestClient(make_app(model_dir)) as client:
        yield client
