"""The checkpoint loader on Mamba folders: HF and mamba_ssm names, tied and untied heads, .bin and
safetensors, bfloat16, and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MambaConfig, MambaForCausalLM

from rnnserve.config import ModelConfig
from rnnserve.models.base import RecurrentLM
from rnnserve.models.loader import ModelLoadError, load_model
from rnnserve.models.mamba import MambaLM
from rnnserve.models.registry import UnsupportedModelError
from tests.models import harness

VOCAB = 96


def tiny_config(**overrides) -> MambaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4, conv_kernel=3, expand=2)
    kw.update(overrides)
    return MambaConfig(**kw)


def _load(path: Path | str, dtype: str = "float32") -> RecurrentLM:
    return load_model(ModelConfig(model=str(path), dtype=dtype, device="cpu", kernels="torch")).model


@torch.no_grad()
def _all_logits(model: RecurrentLM, ids: list[int]) -> torch.Tensor:
    states = harness.alloc_states(model, 3)
    return model.prefill(harness.prefill_batch([ids], [2], [0], model.device, all_logits=True), states)


IDS = [5, 17, 3, 90, 44, 44, 1, 0, 63, 12, 7]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("safetensors", [True, False])
def test_hf_folder_matches_transformers(hf_model_dir, tied: bool, safetensors: bool) -> None:
    folder, ref = hf_model_dir(
        tiny_config(tie_word_embeddings=tied), MambaForCausalLM, jitter=0.05, safe_serialization=safetensors
    )
    assert any(folder.glob("*.safetensors")) == safetensors
    model = _load(folder)
    assert isinstance(model, MambaLM)
    assert (model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()) == tied
    expected = ref(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(_all_logits(model, IDS), expected, atol=1e-4, rtol=1e-4)


def test_mamba_ssm_checkpoint(hf_model_dir, tmp_path: Path) -> None:
    """Original mamba_ssm layout: its own config.json keys, ``backbone.embedding`` and a padded vocab."""
    _, ref = hf_model_dir(tiny_config(vocab_size=96), MambaForCausalLM, jitter=0.05)
    folder = tmp_path / "mamba_ssm"
    folder.mkdir()
    config = {
        "d_model": 32,
        "n_layer": 2,
        "vocab_size": 90,  # padded up to a multiple of 8 -> 96, as mamba_ssm does
        "ssm_cfg": {"d_state": 4, "d_conv": 3, "expand": 2},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ref.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # mamba_ssm's state dict holds both names
    torch.save(sd, folder / "pytorch_model.bin")
    model = _load(folder)
    assert isinstance(model, MambaLM) and model.vocab_size == 96
    expected = ref(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(_all_logits(model, IDS), expected, atol=1e-4, rtol=1e-4)


def test_mamba_ssm_mamba2_layer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 96, "ssm_cfg": {"layer": "Mamba2"}})
    )
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="Mamba2"):
        _load(tmp_path)


def test_unexpected_tensor_is_a_clear_error(hf_model_dir) -> None:
    folder, _ = hf_model_dir(tiny_config())
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    tensors["backbone.layers.0.mixer.surprise"] = torch.zeros(2)
    save_file(tensors, str(file))
    with pytest.raises(ModelLoadError, match="surprise"):
        _load(folder)


def test_wrong_shape_is_a_clear_error(hf_model_dir) -> None:
    folder, _ = hf_model_dir(tiny_config())
    config = json.loads((folder / "config.json").read_text())
    config["state_size"] = 5  # the checkpoint holds A_log [64, 4], x_proj for N = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="checkpoint shape"):
        _load(folder)


def test_bfloat16_loads_and_runs(hf_model_dir) -> None:
    folder, ref = hf_model_dir(tiny_config(), MambaForCausalLM, jitter=0.05)
    model = _load(folder, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    conv, ssm = model.state_specs()[0]
    assert conv.dtype == torch.bfloat16 and ssm.dtype == torch.float32
    # A = -exp(A_log) from the checkpoint's fp32 values, not from the bf16-rounded parameter.
    a_log = load_file(str(folder / "model.safetensors"))["backbone.layers.0.mixer.A_log"]
    torch.testing.assert_close(model.backbone.layers[0].mixer.A, -torch.exp(a_log), atol=0, rtol=0)
    logits = _all_logits(model, IDS)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    expected = ref(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0.05)
    assert len(harness.greedy_generate(model, IDS, 8)) == 8


def test_missing_weight_is_a_clear_error(hf_model_dir) -> None:
    folder, _ = hf_model_dir(tiny_config())
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["backbone.layers.1.mixer.dt_proj.weight"]
    save_file(tensors, str(file))
    with pytest.raises(ModelLoadError, match=r"backbone\.layers\.1\.mixer\.dt_proj\.weight"):
        _load(folder)


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="FooForCausalLM") as info:
        _load(tmp_path)
    assert "MambaForCausalLM" in str(info.value)


def test_hub_id_offline_names_the_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="rnnserve-tests/no-such-mamba"):
        _load("rnnserve-tests/no-such-mamba")


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load(tmp_path / "nowhere" / "model")


def test_broken_config_is_reported_before_missing_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["MambaForCausalLM"],}')
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        _load(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["MambaForCausalLM"]}')
    with pytest.raises(ModelLoadError, match="no weights"):
        _load(tmp_path)
