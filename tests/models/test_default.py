"""The embedded default model: created once, loads through our loader, its tokenizer round-trips."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from rnnserve.config import ModelConfig
from rnnserve.models.default import DEFAULT_MODEL_NAME, ensure_default_model
from rnnserve.models.loader import load_model
from rnnserve.models.mamba import MambaLM
from tests.models import harness


def test_default_model_loads_and_chats(tmp_path: Path) -> None:
    folder = ensure_default_model(tmp_path)
    assert folder == tmp_path / DEFAULT_MODEL_NAME
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_NAME]  # no tmp folder left behind
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert ensure_default_model(tmp_path) == folder
    assert (folder / "config.json").stat().st_mtime_ns == mtime  # reused, not rebuilt

    loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch"))
    assert isinstance(loaded.model, MambaLM) and loaded.model.vocab_size == 50280
    assert loaded.eos_token_id == 0

    tok = AutoTokenizer.from_pretrained(folder)
    text = "Hello, world! Recurrent models keep a fixed-size state."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    prompt = tok.apply_chat_template(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "User: Hi\nAssistant: Hello.\n\nUser: Bye\nAssistant:"

    out = harness.greedy_generate(loaded.model, tok(prompt)["input_ids"], 8)
    assert len(out) == 8 and all(0 <= t < 50280 for t in out)
    assert len(set(out)) > 1  # varied output, not the last prompt token repeated
