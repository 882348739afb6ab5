"""Which class serves which checkpoint: config.json ``architectures`` / ``model_type``, or the key
names of a bare ``.pth`` state dict (BlinkDL RWKV files carry no config)."""

from __future__ import annotations

import importlib

import torch

from rnnserve.models.base import RecurrentLM

# config.json "architectures" entry -> "module:Class"
_ARCHITECTURES: dict[str, str] = {
    "MambaForCausalLM": "rnnserve.models.mamba:MambaLM",
    "RwkvForCausalLM": "rnnserve.models.rwkv4:Rwkv4LM",
    "RWKV7ForCausalLM": "rnnserve.models.rwkv7:Rwkv7LM",
    "Mamba2ForCausalLM": "rnnserve.models.mamba2:Mamba2LM",
    "LlamaForCausalLM": "rnnserve.models.transformer:TransformerLM",
    "GPT2LMHeadModel": "rnnserve.models.transformer:TransformerLM",
    "RetNetForCausalLM": "rnnserve.models.retnet:RetNetLM",
    "DenseMambaForCausalLM": "rnnserve.models.dense_mamba:DenseMambaLM",
    "BambaForCausalLM": "rnnserve.models.bamba:BambaLM",
    "GraniteMoeHybridForCausalLM": "rnnserve.models.granitemoehybrid:GraniteMoeHybridLM",
    "Zamba2ForCausalLM": "rnnserve.models.zamba2:Zamba2LM",
    "JambaForCausalLM": "rnnserve.models.jamba:JambaLM",
    "FalconH1ForCausalLM": "rnnserve.models.falcon_h1:FalconH1LM",
    "NemotronHForCausalLM": "rnnserve.models.nemotron_h:NemotronHLM",
}

# config.json "model_type" -> "module:Class", for configs that name no architecture
_MODEL_TYPES: dict[str, str] = {
    "mamba": "rnnserve.models.mamba:MambaLM",
    "rwkv": "rnnserve.models.rwkv4:Rwkv4LM",
    "rwkv7": "rnnserve.models.rwkv7:Rwkv7LM",
    "mamba2": "rnnserve.models.mamba2:Mamba2LM",
    "llama": "rnnserve.models.transformer:TransformerLM",
    "gpt2": "rnnserve.models.transformer:TransformerLM",
    "retnet": "rnnserve.models.retnet:RetNetLM",
    "dense_mamba": "rnnserve.models.dense_mamba:DenseMambaLM",
    "bamba": "rnnserve.models.bamba:BambaLM",
    "granitemoehybrid": "rnnserve.models.granitemoehybrid:GraniteMoeHybridLM",
    "zamba2": "rnnserve.models.zamba2:Zamba2LM",
    "jamba": "rnnserve.models.jamba:JambaLM",
    "falcon_h1": "rnnserve.models.falcon_h1:FalconH1LM",
    "nemotron_h": "rnnserve.models.nemotron_h:NemotronHLM",
}

# config.json "auto_map" AutoModelForCausalLM target ("module.Class", any "repo--" prefix dropped) ->
# "module:Class". Checked first: the public DenseSSM configs say model_type "llama" (and a saved copy
# "LlamaForCausalLM") while their remote code is a DenseRetNet.
_AUTO_MAP: dict[str, str] = {
    "modeling_dense_gau_retnet.LlamaForCausalLM": "rnnserve.models.dense_retnet:DenseRetNetLM",
}

# config.json keys that identify a family whose config names neither architecture nor model_type:
# original mamba_ssm checkpoints ({"d_model", "n_layer", "ssm_cfg", ...}).
_CONFIG_KEYS: list[tuple[frozenset[str], str]] = [
    (frozenset({"d_model", "n_layer"}), "rnnserve.models.mamba:MambaLM"),
]

# Classes that can recognise a bare state dict (classmethod ``config_from_state_dict(sd) -> dict | None``).
_STATE_DICT_SNIFFERS: list[str] = ["rnnserve.models.rwkv4:Rwkv4LM", "rnnserve.models.rwkv7:Rwkv7LM"]


class UnsupportedModelError(ValueError):
    """The checkpoint is not one of the families rnnserve serves."""


def _import(target: str) -> type[RecurrentLM]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def supported_architectures() -> list[str]:
    return sorted([*_ARCHITECTURES, *_AUTO_MAP])


def resolve_class(hf_config: dict) -> type[RecurrentLM]:
    remote = (hf_config.get("auto_map") or {}).get("AutoModelForCausalLM")
    if isinstance(remote, str) and remote.rpartition("--")[2] in _AUTO_MAP:
        return _import(_AUTO_MAP[remote.rpartition("--")[2]])
    for arch in hf_config.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _import(_ARCHITECTURES[arch])
    model_type = hf_config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _import(_MODEL_TYPES[model_type])
    if not hf_config.get("architectures") and not model_type:
        for keys, target in _CONFIG_KEYS:
            if keys <= hf_config.keys():
                return _import(target)
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
