"""The embedded default model: what ``rnnserve serve`` loads when no ``--model`` is given.

``default-mamba-py-v2`` is a small Mamba (d_model 192, 4 layers, byte-level BPE vocabulary of 4096)
trained on the Python standard library's own source by ``scripts/train_default_model.py``. It
completes Python; its chat template turns each message into a ``#`` comment that the model
continues with code. It ships inside the package (the folder of the same name next to this file, with
its model card in README.md), so serving it needs no download and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "default-mamba-py-v2"
# What the loader and the tokenizer read: a missing one means a broken install, said as such.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_path() -> Path:
    """The folder of the shipped default model (named after the model: the server's model id)."""
    return Path(__file__).resolve().parent / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """The default model's folder, checked complete (a packaging mistake fails here, in one line)."""
    folder = default_model_path()
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(
            f"the embedded default model is incomplete ({', '.join(missing)} missing in {folder}): reinstall rnnserve"
        )
    return folder
