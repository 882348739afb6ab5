"""Jamba (Mamba-1 + attention + MoE) against transformers' JambaForCausalLM: logits and greedy tokens
with attention layers first and last, 5 heads over 1 KV head, MoE (top-2 of 3) and dense layers
mixed; a second layout (multi-head attention in the middle, every layer MoE top-1 of 4, tied head,
mixer biases) from transformers' stacked expert names; prompts resumed from a prefilled state
against the reference's one-shot run (the reference's own cache restarts its SSM state at zero for
a multi-token chunk); the shared checks over the state pool and the paged KV cache; and the engine
under a tiny block budget (preemption)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from rnnserve.config import ModelConfig
from rnnserve.models.jamba import JambaLM, JambaMoE
from rnnserve.models.loader import ModelLoadError, load_model
from tests.models import harness

if not hasattr(transformers, "JambaConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no Jamba", allow_module_level=True)

VOCAB = 61


def _config(**overrides) -> transformers.JambaConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=30,
        intermediate_size=22,
        num_hidden_layers=4,
        attn_layer_period=3,  # attention at layers 0 and 3: first and last
        attn_layer_offset=0,
        expert_layer_period=2,  # MoE at layers 1 (Mamba) and 3 (attention), dense MLP at 0 and 2
        expert_layer_offset=1,
        num_experts=3,
        num_experts_per_tok=2,
        num_attention_heads=5,  # odd head count, GQA 5:1, head_dim 6
        num_key_value_heads=1,
        mamba_d_state=6,
        mamba_d_conv=3,
        mamba_expand=2,
        mamba_dt_rank=3,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # peaked logits, so greedy ties cannot flip on rounding
    )
    kwargs.update(overrides)
    cfg = transformers.JambaConfig(**kwargs)
    # transformers' default grouped_mm experts need 16-byte strides (hidden 30 has not); "eager" is its
    # plain per-expert loop, the reference we want anyway.
    cfg._experts_implementation = "eager"
    return cfg


def _load(folder: Path, dtype: str = "float32") -> JambaLM:
    model = load_model(ModelConfig(model=str(folder), dtype=dtype, device="cpu", kernels="torch")).model
    assert isinstance(model, JambaLM)
    return model


@pytest.fixture(scope="module")
def jamba(tmp_path_factory) -> tuple[torch.nn.Module, JambaLM, Path]:
    from tests.conftest import build_random_hf_model

    ref = build_random_hf_model(_config(), transformers.JambaForCausalLM, seed=1, jitter=0.05)
    folder = tmp_path_factory.mktemp("jamba")
    ref.save_pretrained(folder)  # one tensor per expert, as the published checkpoints
    return ref, _load(folder), folder


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def _check_resumed_logits(ref: torch.nn.Module, ours: JambaLM, prompt: list[int], splits: list[int]) -> None:
    """Our prefill in pieces (each resuming the state and KV blocks of the previous ones), every
    token's logits, == the reference's one-shot logits."""
    ref_logits = ref(torch.tensor([prompt])).logits[0].float()  # [T, V]
    states = harness.alloc_states(ours, 3)
    bounds = [0, *splits, len(prompt)]
    for start, end in itertools.pairwise(bounds):
        batch = harness.prefill_batch([prompt[start:end]], [2], [start], ours.device, all_logits=True, states=states)
        torch.testing.assert_close(
            ours.prefill(batch, states),
            ref_logits[start:end],
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m, s=start: f"from {s}: {m}",
        )


@torch.no_grad()
def test_logits_and_greedy_match_transformers(jamba) -> None:
    ref, ours, _ = jamba
    assert ours.cfg.attn_layer_indices == (0, 3) and ours.cfg.expert_layer_indices == (1, 3)
    prompt = _prompt(37)
    _check_resumed_logits(ref, ours, prompt, [])
    _check_resumed_logits(ref, ours, prompt, [1, 13, 30])

    steps = 20
    ref.generation_config.eos_token_id = None  # greedy over every token, EOS included, as ours
    ref_out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert len(set(ref_out)) > 5  # not a degenerate repeat: the comparison tells models apart
    assert harness.greedy_generate(ours, prompt, steps) == ref_out
    assert harness.greedy_generate(ours, prompt, steps, chunk=5) == ref_out


def test_chunked_prefill_and_batching(jamba) -> None:
    _, model, _ = jamba
    harness.check_chunked_prefill(model, _prompt(35, seed=3), chunk_sizes=(1, 4, 16, 64))
    harness.check_batch_equals_alone(model, [_prompt(n, seed=n) for n in (1, 14, 27)])


def test_layers_declare_state_or_kv(jamba) -> None:
    _, model, _ = jamba
    specs = model.state_specs()
    assert [len(layer) for layer in specs] == [0, 2, 2, 0]
    conv, ssm = specs[1]
    assert (conv.name, conv.shape) == ("conv", (60, 2)) and (ssm.name, ssm.shape) == ("ssm", (60, 6))
    assert ssm.dtype == torch.float32
    kv = model.kv_specs()
    assert len(kv) == 2 and (kv[0].num_kv_heads, kv[0].head_dim) == (1, 6)
    moe = [isinstance(layer.feed_forward, JambaMoE) for layer in model.model.layers]
    assert moe == [False, True, False, True]


@torch.no_grad()
def test_second_layout_from_stacked_expert_names(tmp_path: Path) -> None:
    """Multi-head attention in the middle only, every layer MoE with top-1 of 4, tied embeddings,
    mixer projection biases and no conv bias; saved under transformers' in-memory names
    (``experts.gate_up_proj`` / ``down_proj`` stacked over experts)."""
    from tests.conftest import build_random_hf_model

    cfg = _config(
        hidden_size=24,
        num_hidden_layers=3,
        attn_layer_period=3,
        attn_layer_offset=1,
        expert_layer_period=1,
        expert_layer_offset=0,
        num_experts=4,
        num_experts_per_tok=1,
        num_attention_heads=3,
        num_key_value_heads=3,
        mamba_d_state=5,
        mamba_d_conv=4,
        mamba_dt_rank="auto",
        mamba_proj_bias=True,
        mamba_conv_bias=False,
        tie_word_embeddings=True,
    )
    ref = build_random_hf_model(cfg, transformers.JambaForCausalLM, seed=2, jitter=0.05)
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.feed_forward.experts.gate_up_proj" in state
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    ours = _load(tmp_path)
    assert ours.cfg.attn_layer_indices == (1,) and ours.cfg.expert_layer_indices == (0, 1, 2)
    assert ours.cfg.mamba.dt_rank == 2  # "auto": ceil(24 / 16)
    _check_resumed_logits(ref, ours, _prompt(29, seed=5), [11])


def test_fp32_ssm_params_come_from_the_checkpoint(jamba) -> None:
    """In bf16 the mixers' A, D and dt bias are the checkpoint's fp32 values, not rounded copies."""
    ref, _, folder = jamba
    model = _load(folder, "bfloat16")
    mixer, ref_mixer = model.model.layers[2].mamba, ref.model.layers[2].mamba
    assert mixer.A_log.dtype == torch.bfloat16
    assert torch.equal(mixer.A, -torch.exp(ref_mixer.A_log.float()))
    assert torch.equal(mixer.D_f, ref_mixer.D.float())
    assert torch.equal(mixer.dt_bias_f, ref_mixer.dt_proj.bias.float())


def test_a_missing_expert_is_a_clear_error(jamba, tmp_path: Path) -> None:
    _, _, folder = jamba
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.3.feed_forward.experts.2.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(
        ModelLoadError, match=r"lacks weights for: model\.layers\.3\.feed_forward\.experts\.gate_up_proj"
    ):
        _load(tmp_path)
    tensors["model.layers.3.feed_forward.experts.2.up_proj.weight"] = torch.zeros(22, 30)
    tensors["model.layers.3.feed_forward.experts.3.up_proj.weight"] = torch.zeros(22, 30)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="expert 3 is beyond num_experts 3"):
        _load(tmp_path)


def test_engine_preemption_gives_the_same_greedy_tokens(jamba) -> None:
    """Through the engine with 8 KV blocks of 4 tokens for three sequences of up to 21 tokens (6
    blocks each): the youngest are preempted and recomputed, and every request's tokens equal the
    model alone's."""
    from tests.engine.test_engine import tokens
    from tests.engine.test_engine_kv import _prompts, _run, make_engine

    _, model, _ = jamba
    prompts = _prompts(model, [9, 5, 7])
    engine = make_engine(model, blocks=8)
    outs = _run(engine, prompts, 12)
    assert engine.stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert tokens(outs[f"r{i}"]) == harness.greedy_generate(model, p, 12), i


def test_config_errors() -> None:
    cfg = _config().to_dict()
    with pytest.raises(ValueError, match="attn_layer_offset"):
        JambaLM.from_hf_config({**cfg, "attn_layer_offset": 3}, backend="torch")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        JambaLM.from_hf_config({**cfg, "num_experts_per_tok": 4}, backend="torch")
    with pytest.raises(ValueError, match="hidden_act"):
        JambaLM.from_hf_config({**cfg, "hidden_act": "gelu"}, backend="torch")
