"""Bamba (Mamba-2 + attention hybrid) against transformers' BambaForCausalLM: logits and greedy
tokens, with attention layers first and last, odd head counts, GQA and two Mamba groups; and the
shared checks (chunked prefill, batch == alone) over the state pool and the paged KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from rnnserve.config import ModelConfig
from rnnserve.models.bamba import BambaLM
from rnnserve.models.loader import load_model
from tests.models import harness

if not hasattr(transformers, "BambaConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no Bamba", allow_module_level=True)

VOCAB = 97


def _config(**overrides) -> transformers.BambaConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=36,
        intermediate_size=52,
        num_hidden_layers=4,
        attn_layer_indices=[0, 3],  # attention first and last, Mamba-2 between
        num_attention_heads=3,  # odd head count, GQA 3:1, head_dim 12 (RoPE on its first 6 dims)
        num_key_value_heads=1,
        mamba_n_heads=6,
        mamba_d_head=12,  # expand 2 * 36 = 72 = 6 x 12
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_d_conv=3,
        mamba_chunk_size=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.15,  # peaked logits, so greedy ties cannot flip on rounding
    )
    kwargs.update(overrides)
    return transformers.BambaConfig(**kwargs)


@pytest.fixture(scope="module")
def bamba(tmp_path_factory) -> tuple[torch.nn.Module, BambaLM]:
    from tests.conftest import build_random_hf_model

    ref = build_random_hf_model(_config(), transformers.BambaForCausalLM, seed=0, jitter=0.05)
    folder = tmp_path_factory.mktemp("bamba")
    ref.save_pretrained(folder)
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch"))
    assert isinstance(loaded.model, BambaLM)
    return ref, loaded.model


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def test_logits_and_greedy_match_transformers(bamba) -> None:
    ref, ours = bamba
    assert ours.cfg.rotary_dim == 6 and ours.cfg.attn_layer_indices == (0, 3)
    prompt = _prompt(41)
    ref_logits = ref(torch.tensor([prompt])).logits[0].float()  # [T, V]
    states = harness.alloc_states(ours, 3)
    batch = harness.prefill_batch([prompt], [2], [0], ours.device, all_logits=True, states=states)
    torch.testing.assert_close(ours.prefill(batch, states), ref_logits, atol=1e-4, rtol=1e-4)

    steps = 24
    ref_out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert harness.greedy_generate(ours, prompt, steps) == ref_out
    assert harness.greedy_generate(ours, prompt, steps, chunk=7) == ref_out


def test_chunked_prefill_and_batching(bamba) -> None:
    _, model = bamba
    harness.check_chunked_prefill(model, _prompt(35, seed=3), chunk_sizes=(1, 5, 16, 64))
    harness.check_batch_equals_alone(model, [_prompt(n, seed=n) for n in (1, 17, 30)])


def test_layers_declare_state_or_kv(bamba) -> None:
    _, model = bamba
    specs = model.state_specs()
    assert [len(layer) for layer in specs] == [0, 2, 2, 0]
    assert [s.name for s in specs[1]] == ["conv", "ssm"] and specs[1][1].dtype == torch.float32
    kv = model.kv_specs()
    assert len(kv) == 2 and (kv[0].num_kv_heads, kv[0].head_dim) == (1, 12)


def test_fp32_ssm_params_come_from_the_checkpoint(tmp_path: Path) -> None:
    """In bf16 the mixers' A, dt_bias and D are the checkpoint's fp32 values, not rounded copies."""
    from tests.conftest import build_random_hf_model

    ref = build_random_hf_model(_config(), transformers.BambaForCausalLM, seed=1, jitter=0.05)
    ref.save_pretrained(tmp_path)
    model = load_model(ModelConfig(model=str(tmp_path), dtype="bfloat16", device="cpu", kernels="torch")).model
    mixer, ref_mixer = model.model.layers[1].mamba, ref.model.layers[1].mamba
    assert model.model.layers[1].mamba.A_log.dtype == torch.bfloat16
    assert torch.equal(mixer.A, -torch.exp(ref_mixer.A_log.float()))
    assert torch.equal(mixer.dt_bias_f, ref_mixer.dt_bias.float())
    assert torch.equal(mixer.D_f, ref_mixer.D.float())


def test_config_errors() -> None:
    cfg = _config().to_dict()
    with pytest.raises(ValueError, match="attn_layer_indices"):
        BambaLM.from_hf_config({**cfg, "attn_layer_indices": [4]}, backend="torch")
    with pytest.raises(ValueError, match="mamba_n_heads"):
        BambaLM.from_hf_config({**cfg, "mamba_d_head": 5}, backend="torch")
