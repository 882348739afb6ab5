"""DenseMamba: m = 0 equal to transformers' MambaForCausalLM, the dense model against an independent
token-by-token reference written here, and the shared chunked-prefill (parallel) == decode (recurrent)
and batch == alone checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM

from rnnserve.config import ModelConfig
from rnnserve.models.dense_mamba import DenseMambaLM
from rnnserve.models.loader import ModelLoadError, load_model
from rnnserve.models.registry import resolve_class
from tests.conftest import build_random_hf_model
from tests.models import harness

VOCAB = 89


def hf_config(**overrides: object) -> HFMambaConfig:
    kw = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "state_size": 8,
        "num_hidden_layers": 3,
        "intermediate_size": 96,
        "conv_kernel": 4,
        "time_step_rank": 5,
        "tie_word_embeddings": False,
    }
    kw.update(overrides)
    return HFMambaConfig(**kw)


def dense_folder(tmp_path: Path, m: int, seed: int = 0, **overrides: object) -> tuple[Path, dict, MambaForCausalLM]:
    """A transformers Mamba with random (jittered) weights plus random dense-fusion weights on layers 1..,
    saved as a DenseMambaForCausalLM folder. Returns (folder, state dict, the transformers model)."""
    cfg = hf_config(**overrides)
    ref = build_random_hf_model(cfg, MambaForCausalLM, seed=seed, jitter=0.05)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(seed + 10)
    d, e = cfg.hidden_size, cfg.intermediate_size
    if m:
        for i in range(1, cfg.num_hidden_layers):
            p = f"backbone.layers.{i}.mixer."
            sd[p + "y_select.fc1.weight"] = torch.randn(d // 32, d, generator=g) * 0.5
            sd[p + "y_select.fc2.weight"] = torch.randn(e, d // 32, generator=g) * 0.5
            sd[p + "y_norm.weight"] = 1.0 + torch.randn(e, generator=g) * 0.1
    config = {**cfg.to_dict(), "architectures": ["DenseMambaForCausalLM"], "model_type": "dense_mamba"}
    config["dense_block_layers"] = m
    folder = tmp_path / f"dense_mamba_{m}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder, sd, ref


def load(folder: Path) -> DenseMambaLM:
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    assert isinstance(model, DenseMambaLM)
    return model


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def sequential_logits(sd: dict[str, torch.Tensor], cfg: HFMambaConfig, m: int, tokens: list[int]) -> torch.Tensor:
    """The dense model one token at a time, explicit conv window and SSM state per layer, float64."""
    sd = {k: v.double() for k, v in sd.items()}
    e, n, k, r, eps = cfg.intermediate_size, cfg.state_size, cfg.conv_kernel, cfg.time_step_rank, cfg.layer_norm_epsilon
    layers = cfg.num_hidden_layers
    window = [torch.zeros(e, k, dtype=torch.float64) for _ in range(layers)]
    ssm = [torch.zeros(e, n, dtype=torch.float64) for _ in range(layers)]
    head = sd.get("lm_head.weight", sd["backbone.embeddings.weight"])
    out = []
    for tok in tokens:
        h = sd["backbone.embeddings.weight"][tok]
        past: list[torch.Tensor] = []
        for i in range(layers):
            p = f"backbone.layers.{i}.mixer."
            xn = _rms(h, sd[f"backbone.layers.{i}.norm.weight"], eps)
            x, z = (sd[p + "in_proj.weight"] @ xn).split(e)
            window[i] = torch.cat((window[i][:, 1:], x[:, None]), dim=1)
            xc = F.silu((window[i] * sd[p + "conv1d.weight"][:, 0, :]).sum(-1) + sd[p + "conv1d.bias"])
            delta, b, c = (sd[p + "x_proj.weight"] @ xc).split([r, n, n])
            dt = F.softplus(sd[p + "dt_proj.weight"] @ delta + sd[p + "dt_proj.bias"])
            a = -torch.exp(sd[p + "A_log"])
            ssm[i] = torch.exp(dt[:, None] * a) * ssm[i] + (dt * xc)[:, None] * b[None, :]
            y = ssm[i] @ c + sd[p + "D"] * xc
            y_raw = y
            if m and i > 0:
                gate = F.silu(sd[p + "y_select.fc2.weight"] @ F.silu(sd[p + "y_select.fc1.weight"] @ xn))
                y = _rms(y + sum(gate * yp for yp in past), sd[p + "y_norm.weight"], eps)
            h = h + sd[p + "out_proj.weight"] @ (y * F.silu(z))
            if m:
                past = [*past, y_raw][-m:]
        out.append(_rms(h, sd["backbone.norm_f.weight"], eps) @ head.T)
    return torch.stack(out).float()


def _seqs(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _prefill_all_logits(model: DenseMambaLM, seqs: list[list[int]]) -> torch.Tensor:
    states = harness.alloc_states(model, 2 * len(seqs) + 2)
    batch = harness.prefill_batch(seqs, [2 * i + 1 for i in range(len(seqs))], [0] * len(seqs), model.device, True)
    with torch.no_grad():
        return model.prefill(batch, states)


@torch.no_grad()
def test_m0_equals_transformers_mamba(tmp_path: Path) -> None:
    folder, _, ref = dense_folder(tmp_path, 0, tie_word_embeddings=True)
    model = load(folder)
    seq = _seqs(1, (26,))[0]
    expected = ref(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(_prefill_all_logits(model, [seq]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [1, 2])
def test_matches_sequential_reference(tmp_path: Path, m: int) -> None:
    folder, sd, _ = dense_folder(tmp_path, m, seed=m)
    model = load(folder)
    seqs = _seqs(2, (17, 3, 30))
    expected = torch.cat([sequential_logits(sd, hf_config(), m, s) for s in seqs])
    torch.testing.assert_close(_prefill_all_logits(model, seqs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [1, 2])
def test_chunked_prefill_and_batch(tmp_path: Path, m: int) -> None:
    """Parallel (chunked prefill, any chunk size, chunks ending inside the conv window) == recurrent
    (token-by-token decode), and batch == alone."""
    folder, _, _ = dense_folder(tmp_path, m, seed=3 + m)
    model = load(folder)
    prompt = _seqs(3, (19,))[0]
    harness.check_chunked_prefill(model, prompt, chunk_sizes=(1, 2, 3, 7, 64))
    harness.check_batch_equals_alone(model, [prompt[:9], prompt, prompt[:2]])


def test_dense_connection_changes_the_output(tmp_path: Path) -> None:
    folder, sd, _ = dense_folder(tmp_path, 1, seed=9)
    seqs = _seqs(4, (12,))
    dense = _prefill_all_logits(load(folder), seqs)
    plain = torch.cat([sequential_logits(sd, hf_config(), 0, s) for s in seqs])
    assert (dense - plain).abs().max() > 1e-2


def test_registry_and_missing_dense_weights(tmp_path: Path) -> None:
    assert resolve_class({"architectures": ["DenseMambaForCausalLM"]}) is DenseMambaLM
    assert resolve_class({"model_type": "dense_mamba"}) is DenseMambaLM
    folder, _, _ = dense_folder(tmp_path, 0)
    config = json.loads((folder / "config.json").read_text())
    config["dense_block_layers"] = 1  # a plain Mamba checkpoint declared dense: its fusion weights are missing
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="y_select"):
        load(folder)
