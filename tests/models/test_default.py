"""The embedded default model is the trained one: it ships complete, loads through our loader,
re-scores its model card's held-out subset within 5% through rnnserve's own Mamba code, and completes
Python (none of which random weights would do)."""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rnnserve.config import ModelConfig
from rnnserve.models.base import RecurrentLM
from rnnserve.models.default import DEFAULT_MODEL_NAME, default_model_path, ensure_default_model
from rnnserve.models.loader import LoadedModel, load_model
from rnnserve.models.mamba import MambaLM
from tests.models import harness


@pytest.fixture(scope="module")
def folder() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="module")
def record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "training.json").read_text())


@pytest.fixture(scope="module")
def loaded(folder: Path) -> LoadedModel:
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch"))


@pytest.fixture(scope="module")
def tok(folder: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(folder)


def test_ships_in_the_package_complete_and_small(folder: Path, loaded: LoadedModel, record: dict[str, Any]) -> None:
    assert folder == default_model_path() and folder.name == DEFAULT_MODEL_NAME
    assert Path(__file__).resolve().parents[2] / "rnnserve" in folder.parents  # package data, not a cache
    assert (folder / "model.safetensors").stat().st_size <= 10 * 2**20
    assert isinstance(loaded.model, MambaLM) and loaded.eos_token_id == 0
    assert loaded.model.vocab_size == record["settings"]["vocab_size"]
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert n_params == record["parameters"]
    card = (folder / "README.md").read_text()
    for figure in (record["held_out"]["loss"], record["held_out_subset"]["loss"]):
        assert f"{figure:.4f}" in card  # the model card states what training.json measured
    assert "PSF" in card and "scripts/train_default_model.py" in card


def test_tokenizer_round_trips_and_chat_is_a_comment(tok: PreTrainedTokenizerBase) -> None:
    text = "def f(x):\n    return {'é': x ** 2}  # naïve ✓\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text encodes
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    prompt = tok.apply_chat_template(
        [
            {"role": "system", "content": "Python only."},
            {"role": "user", "content": "Reverse a list\nin place"},
            {"role": "assistant", "content": "xs.reverse()"},
            {"role": "user", "content": "Sort it"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "# Python only.\n# Reverse a list\n# in place\nxs.reverse()\n# Sort it\n"


def _score(model: RecurrentLM, windows: list[list[int]], group: int = 8) -> tuple[float, int]:
    """Summed cross-entropy (nats) and predicted tokens, each window prefilled from a fresh slot."""
    total, count = 0.0, 0
    for s in range(0, len(windows), group):
        ws = windows[s : s + group]
        states = harness.alloc_states(model, len(ws) + 1)
        batch = harness.prefill_batch(ws, range(1, len(ws) + 1), [0] * len(ws), model.device, True, states)
        logits = model.prefill(batch, states).float()  # [sum of lengths, V]
        targets = torch.tensor([t for w in ws for t in [*w[1:], -100]])  # a window's last token predicts nothing
        total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        count += sum(len(w) - 1 for w in ws)
    return total, count


def test_held_out_loss_reproduces_the_model_card(
    loaded: LoadedModel, tok: PreTrainedTokenizerBase, record: dict[str, Any]
) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name, digest in record["subset_files"].items():
        path = stdlib / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            pytest.skip(f"this Python's {name} differs from the one the model card was scored on")
        texts.append(path.read_text(encoding="utf-8"))
    window = record["settings"]["eval_window"]
    windows = []
    for text in texts:  # as scripts/train_default_model.py cuts them: <|endoftext|> + file, fixed windows
        ids = [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        windows += [ids[s : s + window] for s in range(0, len(ids), window) if len(ids[s : s + window]) > 1]
    windows = windows[: record["settings"]["subset_windows"]]
    total, count = _score(loaded.model, windows)
    card = record["held_out_subset"]
    assert count == card["tokens"], (count, card["tokens"])  # the same tokens were scored
    loss = total / count
    assert abs(loss - card["loss"]) <= 0.05 * card["loss"], (loss, card["loss"])
    # Random weights score about ln(vocab) or worse; the trained model is far below it.
    assert loss < 0.6 * math.log(loaded.model.vocab_size)


def test_greedy_completion_is_python(loaded: LoadedModel, tok: PreTrainedTokenizerBase) -> None:
    prompt = "class Point:\n    def __init__(self"
    out = harness.greedy_generate(loaded.model, tok(prompt)["input_ids"], 24)
    text = tok.decode(out)
    assert "):" in text and "self." in text, text  # closes the signature, then assigns attributes
