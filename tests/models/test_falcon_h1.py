"""Falcon-H1 (attention and Mamba-2 side by side in every layer) against transformers'
FalconH1ForCausalLM: logits and greedy tokens with every multiplier away from 1 and each one shown to
matter, odd head counts, GQA, a head_dim and a Mamba width of their own, two Mamba groups, the gated
norm on (before or after the gate) and off; the shared checks over the state pool and the paged KV
cache (chunked prefill, batch == alone); and the engine under a tiny block budget (preemption)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from rnnserve.config import ModelConfig
from rnnserve.models.falcon_h1 import FalconH1Config, FalconH1LM
from rnnserve.models.loader import load_model
from tests.models import harness

if not hasattr(transformers, "FalconH1Config"):
    pytest.skip(f"transformers {transformers.__version__} has no FalconH1", allow_module_level=True)

VOCAB = 83

# Every multiplier differs from 1 and from the others, so swapping or dropping one changes the logits.
MULTIPLIERS = dict(
    embedding_multiplier=1.6,
    lm_head_multiplier=0.7,
    attention_in_multiplier=0.8,
    attention_out_multiplier=1.3,
    key_multiplier=0.6,
    ssm_in_multiplier=1.2,
    ssm_out_multiplier=0.75,
    ssm_multipliers=[0.5, 1.4, 0.7, 1.3, 0.6],  # z, x, B, C, dt
    mlp_multipliers=[1.5, 0.8],  # gate, down
)

# (mamba_rms_norm, mamba_norm_before_gate, biases)
VARIANTS = {
    "norm_after_gate": (True, False, True),
    "norm_before_gate": (True, True, False),
    "no_norm": (False, True, False),
}


def _config(rms_norm: bool, before_gate: bool, biases: bool) -> transformers.FalconH1Config:
    return transformers.FalconH1Config(
        vocab_size=VOCAB,
        hidden_size=36,
        intermediate_size=44,
        num_hidden_layers=3,
        num_attention_heads=3,  # odd head count, GQA 3:1, head_dim 10 (not hidden / heads = 12)
        num_key_value_heads=1,
        head_dim=10,
        mamba_d_ssm=60,  # not mamba_expand * hidden_size = 72
        mamba_n_heads=6,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_d_conv=3,
        mamba_chunk_size=16,
        mamba_rms_norm=rms_norm,
        mamba_norm_before_gate=before_gate,
        mamba_proj_bias=biases,
        projectors_bias=biases,
        attention_bias=biases,
        mlp_bias=biases,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.15,  # peaked logits, so greedy ties cannot flip on rounding
        **MULTIPLIERS,
    )


def _pair(tmp_path, variant: str, seed: int = 0) -> tuple[torch.nn.Module, FalconH1LM]:
    from tests.conftest import build_random_hf_model

    ref = build_random_hf_model(_config(*VARIANTS[variant]), transformers.FalconH1ForCausalLM, seed=seed, jitter=0.05)
    ref.generation_config.eos_token_id = None  # greedy over every token, EOS included, as ours
    ref.save_pretrained(tmp_path)
    model = load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu", kernels="torch")).model
    assert isinstance(model, FalconH1LM)
    return ref, model


@pytest.fixture(scope="module")
def falcon(tmp_path_factory) -> tuple[torch.nn.Module, FalconH1LM]:
    return _pair(tmp_path_factory.mktemp("falcon_h1"), "norm_after_gate")


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def _all_logits(model: FalconH1LM, prompt: list[int]) -> torch.Tensor:
    states = harness.alloc_states(model, 3)
    batch = harness.prefill_batch([prompt], [2], [0], model.device, all_logits=True, states=states)
    return model.prefill(batch, states)  # [T, V]


@torch.no_grad()
def _check_against_transformers(ref: torch.nn.Module, ours: FalconH1LM, steps: int, chunks: tuple = (None, 5)) -> None:
    prompt = _prompt(37)
    ref_logits = ref(torch.tensor([prompt])).logits[0].float()  # [T, V]
    torch.testing.assert_close(_all_logits(ours, prompt), ref_logits, atol=1e-4, rtol=1e-4)
    ref_out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    for chunk in chunks:
        assert harness.greedy_generate(ours, prompt, steps, chunk=chunk) == ref_out, chunk


def test_logits_and_greedy_match_transformers(falcon) -> None:
    ref, ours = falcon
    cfg = ours.cfg
    assert cfg.attn_layer_indices == (0, 1, 2) and (cfg.head_dim, cfg.mamba.intermediate_size) == (10, 60)
    assert cfg.mamba_rms_norm and not cfg.mamba_norm_before_gate and cfg.projectors_bias
    _check_against_transformers(ref, ours, steps=20)


@pytest.mark.parametrize("variant", ["norm_before_gate", "no_norm"])
def test_mamba_norm_variants_match_transformers(tmp_path, variant: str) -> None:
    ref, ours = _pair(tmp_path, variant, seed=1)
    assert (ours.model.layers[0].mamba.norm is None) == (variant == "no_norm")
    _check_against_transformers(ref, ours, steps=8, chunks=(7,))


@torch.no_grad()
def test_every_multiplier_matters(falcon) -> None:
    """The same weights with one multiplier (or one entry of ssm_multipliers / mlp_multipliers) set
    back to 1, or the norm's side of the gate flipped, give logits far from transformers': so the
    match above checks each of them."""
    ref, ours = falcon
    prompt = _prompt(19, seed=5)
    ref_logits = ref(torch.tensor([prompt])).logits[0].float()
    state = dict(ours.state_dict())
    changes: list[tuple[str, dict]] = [(k, {k: 1.0}) for k, v in MULTIPLIERS.items() if not isinstance(v, list)]
    for key in ("ssm_multipliers", "mlp_multipliers"):
        for j in range(len(MULTIPLIERS[key])):
            values = list(MULTIPLIERS[key])
            values[j] = 1.0
            changes.append((f"{key}[{j}]", {key: tuple(values)}))
    changes.append(("mamba_norm_before_gate", {"mamba_norm_before_gate": True}))
    for name, change in changes:
        model = FalconH1LM(dataclasses.replace(ours.cfg, **change))
        model.load_state_dict(state)
        for mixer, ref_mixer in zip((layer.mamba for layer in model.model.layers), ref.model.layers):
            mixer.set_fp32_params(ref_mixer.mamba.A_log, ref_mixer.mamba.dt_bias, ref_mixer.mamba.D)
        model.post_load()
        gap = (_all_logits(model, prompt) - ref_logits).abs().max().item()
        assert gap > 1e-2, f"{name} set back to 1 leaves the logits within {gap:.1e} of transformers'"


def test_chunked_prefill_and_batching(falcon) -> None:
    _, model = falcon
    harness.check_chunked_prefill(model, _prompt(23, seed=3), chunk_sizes=(1, 5, 16))
    harness.check_batch_equals_alone(model, [_prompt(n, seed=n) for n in (1, 17, 20)])


def test_every_layer_declares_state_and_kv(falcon) -> None:
    _, model = falcon
    specs = model.state_specs()
    assert [[s.name for s in layer] for layer in specs] == [["conv", "ssm"]] * 3
    assert specs[0][0].shape == (60 + 2 * 2 * 8, 2) and specs[0][1].shape == (6, 8, 10)
    assert specs[0][1].dtype == torch.float32
    kv = model.kv_specs()
    assert len(kv) == 3 and (kv[0].num_kv_heads, kv[0].head_dim) == (1, 10)


def test_engine_preemption_gives_the_same_greedy_tokens(falcon) -> None:
    """Through the engine with 8 KV blocks of 4 tokens for three sequences of up to 21 tokens (6
    blocks each): the youngest are preempted and recomputed, and every request's tokens equal the
    model alone's."""
    from tests.engine.test_engine import tokens
    from tests.engine.test_engine_kv import _prompts, _run, make_engine

    _, model = falcon
    prompts = _prompts(model, [9, 5, 7])
    engine = make_engine(model, blocks=8)
    outs = _run(engine, prompts, 12)
    assert engine.stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert tokens(outs[f"r{i}"]) == harness.greedy_generate(model, p, 12), i


def test_config_errors() -> None:
    cfg = _config(True, False, False).to_dict()
    with pytest.raises(ValueError, match="mamba_n_heads"):
        FalconH1LM.from_hf_config({**cfg, "mamba_d_ssm": 64}, backend="torch")
    with pytest.raises(ValueError, match="ssm_multipliers"):
        FalconH1LM.from_hf_config({**cfg, "ssm_multipliers": [1.0, 2.0]}, backend="torch")
    with pytest.raises(ValueError, match="num_attention_heads"):
        FalconH1LM.from_hf_config({**cfg, "num_key_value_heads": 2}, backend="torch")
    assert isinstance(FalconH1Config.from_hf(cfg), FalconH1Config)
