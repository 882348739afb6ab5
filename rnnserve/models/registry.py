"""Which class serves which checkpoint: config.json ``architectures`` / ``model_type``, or the key
names of a bare ``.pth`` state dict (BlinkDL RWKV files carry no config)."""

from __future__ import annotations

import importlib

import torch

from rnnserve.models.base import RecurrentLM

# config.json "architectures" entry -> "module:Class"
_ARCHITECTURES: dict[str, str] = {
    "MambaForCausalLM": "rnnserve.models.mamba:MambaLM",
    "LlamaForCausalLM": "rnnserve.models.transformer:TransformerLM",
    "GPT2LMHeadModel": "rnnserve.models.transformer:TransformerLM",
}

# config.json "model_type" -> "module:Class", for configs that name no architecture
_MODEL_TYPES: dict[str, str] = {
    "mamba": "rnnserve.models.mamba:MambaLM",
    "llama": "rnnserve.models.transformer:TransformerLM",
    "gpt2": "rnnserve.models.transformer:TransformerLM",
}

# Classes that can recognise a bare state dict (classmethod ``config_from_state_dict(sd) -> dict | None``).
_STATE_DICT_SNIFFERS: list[str] = []


class UnsupportedModelError(ValueError):
    """The checkpoint is not one of the families rnnserve serves."""


def _import(target: str) -> type[RecurrentLM]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def resolve_class(hf_config: dict) -> type[RecurrentLM]:
    for arch in hf_config.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _import(_ARCHITECTURES[arch])
    model_type = hf_config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _import(_MODEL_TYPES[model_type])
    named = hf_config.get("architectures") or model_type or "nothing"
    raise UnsupportedModelError(
        f"unsupported model architecture {named!r}; rnnserve supports: {', '.join(supported_architectures())}"
    )


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """An HF-like config for a bare state dict, from the first family that recognises its names."""
    for target in _STATE_DICT_SNIFFERS:
        config = _import(target).config_from_state_dict(state_dict)
        if config is not None:
            return config
    raise UnsupportedModelError(
        "the checkpoint file has no config.json and its tensor names match no supported family "
        f"(supported architectures: {', '.join(supported_architectures())})"
    )
