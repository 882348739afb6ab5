"""Nemotron-H (NemotronHForCausalLM) against transformers: logits and greedy tokens for a pattern with
attention first and last, Mamba-2, MLP and MoE layers (grouped routing, correction bias, scaling), and
for an older ``hybrid_override_pattern`` config with a latent MoE; the shared checks (chunked prefill,
batch == alone, resumed state) over the state pool and the paged KV cache; the fp32 router and SSM
parameters in bf16; config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from rnnserve.config import ModelConfig
from rnnserve.models.loader import ModelLoadError, load_model
from rnnserve.models.nemotron_h import NemotronHLM
from tests.models import harness

if not hasattr(transformers, "NemotronHConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no NemotronH", allow_module_level=True)

VOCAB = 83
# attention first and last; Mamba-2, MLP-only and MoE layers between
BLOCKS = ["full_attention", "linear_attention", "mlp", "moe", "linear_attention", "full_attention"]


def _config(**overrides) -> transformers.NemotronHConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=36,
        layers_block_type=BLOCKS,
        num_attention_heads=5,  # odd head count, GQA 5:1, head_dim 8 (5 * 8 != hidden 36)
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=44,
        mamba_num_heads=6,
        mamba_head_dim=10,  # E = 60, not expand * hidden
        n_groups=3,
        ssm_state_size=8,
        conv_kernel=3,
        chunk_size=16,
        use_conv_bias=True,
        n_routed_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=20,
        moe_shared_expert_intermediate_size=14,
        n_group=3,
        topk_group=2,
        routed_scaling_factor=1.7,
        max_position_embeddings=512,
        layer_norm_epsilon=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.15,  # peaked logits, so greedy ties cannot flip on rounding
    )
    kwargs.update(overrides)
    return transformers.NemotronHConfig(**kwargs)


def _reference(config: transformers.NemotronHConfig, seed: int) -> torch.nn.Module:
    from tests.conftest import build_random_hf_model

    ref = build_random_hf_model(config, transformers.NemotronHForCausalLM, seed=seed, jitter=0.05)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in ref.model.layers:
            if layer.block_type == "moe":  # a buffer (not jittered): make ignoring it visible
                bias = layer.mixer.gate.e_score_correction_bias
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.3)
    return ref


def _save(ref: torch.nn.Module, folder: Path, config_edit=None) -> NemotronHLM:
    ref.save_pretrained(folder)
    if config_edit is not None:
        path = folder / "config.json"
        path.write_text(json.dumps(config_edit(json.loads(path.read_text()))))
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    assert isinstance(model, NemotronHLM)
    return model


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory) -> tuple[torch.nn.Module, NemotronHLM]:
    ref = _reference(_config(), seed=0)
    return ref, _save(ref, tmp_path_factory.mktemp("nemotron_h"))


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def _check_against(ref: torch.nn.Module, ours: NemotronHLM, prompt: list[int], steps: int) -> None:
    ref_logits = ref(torch.tensor([prompt])).logits[0].float()  # [T, V]
    states = harness.alloc_states(ours, 3)
    batch = harness.prefill_batch([prompt], [2], [0], ours.device, all_logits=True, states=states)
    torch.testing.assert_close(ours.prefill(batch, states), ref_logits, atol=1e-4, rtol=1e-4)
    ref.generation_config.eos_token_id = None  # greedy over every token, EOS included, as ours
    ref_out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert harness.greedy_generate(ours, prompt, steps) == ref_out
    assert harness.greedy_generate(ours, prompt, steps, chunk=6) == ref_out


def test_logits_and_greedy_match_transformers(nemotron) -> None:
    ref, ours = nemotron
    assert ours.cfg.blocks == ("attention", "mamba", "mlp", "moe", "mamba", "attention")
    assert ours.cfg.attn_layer_indices == (0, 5) and ours.cfg.mamba.time_step_limit[0] == pytest.approx(1e-3)
    _check_against(ref, ours, _prompt(37), steps=20)


def test_pattern_config_with_latent_moe_matches_transformers(tmp_path: Path) -> None:
    """An older config (``hybrid_override_pattern`` and ``mamba_*`` key names, as on the Hub), a MoE
    on a latent projection, one expert group, unnormalised top-k weights; attention in the middle."""
    cfg = _config(
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention"],
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=12,
        moe_latent_size=16,
        n_routed_experts=5,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        mlp_bias=True,
        use_bias=True,
    )
    ref = _reference(cfg, seed=2)

    def legacy(c: dict) -> dict:
        c.pop("layers_block_type")
        c["hybrid_override_pattern"] = "ME*-M"
        c["num_hidden_layers"] = 5
        c["mamba_n_groups"], c["mamba_d_conv"] = c.pop("n_groups"), c.pop("conv_kernel")
        return c

    ours = _save(ref, tmp_path, legacy)
    assert ours.cfg.blocks == ("mamba", "moe", "attention", "mlp", "mamba") and ours.cfg.moe_latent_size == 16
    _check_against(ref, ours, _prompt(29, seed=5), steps=12)


def test_chunked_prefill_batching_and_resumed_state(nemotron) -> None:
    _, model = nemotron
    harness.check_chunked_prefill(model, _prompt(35, seed=3), chunk_sizes=(1, 5, 16, 64))
    harness.check_batch_equals_alone(model, [_prompt(n, seed=n) for n in (1, 17, 30)])
    # A sequence resumed in another slot after its first 20 tokens, from a copy of its recurrent state
    # and of its KV blocks (the first slot then freed and zeroed), continues exactly as the
    # uninterrupted one.
    prompt = _prompt(31, seed=9)
    whole = harness.alloc_states(model, 3)
    expect = harness.prefill_in_chunks(model, whole, [prompt], [1], None)[0]
    states = harness.alloc_states(model, 3)
    harness.prefill_in_chunks(model, states, [prompt[:20]], [1], None)
    cache = states.kv_cache
    assert cache.allocate(2, 20)
    for k_cache, v_cache in cache.caches:  # [num_blocks + 1, block_size, Hkv, hd]
        for src, dst in zip(cache.block_table(1), cache.block_table(2)):
            k_cache[dst], v_cache[dst] = k_cache[src].clone(), v_cache[src].clone()
    cache.free(1)
    for layer in states:
        for tensor in layer.values():
            tensor[2] = tensor[1]
            tensor[1].zero_()
    batch = harness.prefill_batch([prompt[20:]], [2], [20], model.device, states=states)
    torch.testing.assert_close(model.prefill(batch, states)[0], expect, atol=1e-4, rtol=1e-4)


def test_engine_serves_it_under_a_tight_kv_budget(nemotron) -> None:
    """Through the engine with too few KV blocks for all three sequences: requests are preempted and
    recomputed, the greedy tokens are the model's alone, and no block or slot is left held."""
    from tests.engine.test_engine import tokens
    from tests.engine.test_engine_kv import _prompts, _run, make_engine

    _, model = nemotron
    prompts = _prompts(model, [9, 5, 7])
    engine = make_engine(model, blocks=10, budget=16)
    outs = _run(engine, prompts, 12)
    assert engine.stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert tokens(outs[f"r{i}"]) == harness.greedy_generate(model, p, 12)


def test_layers_declare_state_kv_or_nothing(nemotron) -> None:
    _, model = nemotron
    specs = model.state_specs()
    assert [len(layer) for layer in specs] == [0, 2, 0, 0, 2, 0]
    assert [s.name for s in specs[1]] == ["conv", "ssm"] and specs[1][0].shape == (60 + 2 * 3 * 8, 2)
    assert specs[1][1].shape == (6, 8, 10) and specs[1][1].dtype == torch.float32
    kv = model.kv_specs()
    assert len(kv) == 2 and (kv[0].num_kv_heads, kv[0].head_dim) == (1, 8)
    recurrent = NemotronHLM.from_hf_config(
        {**_config().to_dict(), "layers_block_type": ["linear_attention", "mlp"]}, backend="torch"
    )
    assert recurrent.kv_specs() == [] and recurrent.max_model_len is None


def test_bf16_keeps_router_and_ssm_params_fp32(tmp_path: Path) -> None:
    ref = _reference(_config(), seed=1)
    ref.save_pretrained(tmp_path)
    model = load_model(ModelConfig(model=str(tmp_path), dtype="bfloat16", device="cpu", kernels="torch")).model
    gate, ref_gate = model.backbone.layers[3].mixer.gate, ref.model.layers[3].mixer.gate
    assert model.dtype == torch.bfloat16 and gate.weight.dtype == torch.float32
    assert torch.equal(gate.weight, ref_gate.weight) and torch.equal(
        gate.e_score_correction_bias, ref_gate.e_score_correction_bias
    )
    mixer, ref_mixer = model.backbone.layers[1].mixer, ref.model.layers[1].mixer
    assert mixer.A_log.dtype == torch.bfloat16 and torch.equal(mixer.A, -torch.exp(ref_mixer.A_log.float()))
    states = harness.alloc_states(model, 2)
    logits = harness.prefill_in_chunks(model, states, [_prompt(9)], [1], 4)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_config_errors(tmp_path: Path) -> None:
    cfg = _config().to_dict()
    with pytest.raises(ValueError, match="unknown types"):
        NemotronHLM.from_hf_config({**cfg, "layers_block_type": ["mamba", "cross_attention"]}, backend="torch")
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        NemotronHLM.from_hf_config(
            {**cfg, "layers_block_type": None, "hybrid_override_pattern": "M*X"}, backend="torch"
        )
    with pytest.raises(ValueError, match="mlp_hidden_act"):
        NemotronHLM.from_hf_config({**cfg, "mlp_hidden_act": "gelu"}, backend="torch")
    with pytest.raises(ValueError, match="MoE routing"):
        NemotronHLM.from_hf_config({**cfg, "n_group": 4}, backend="torch")
    with pytest.raises(ValueError, match="multiple"):
        NemotronHLM.from_hf_config({**cfg, "num_key_value_heads": 2}, backend="torch")
    # A checkpoint missing a routed expert is refused with the name, not served half-loaded.
    ref = _reference(_config(), seed=3)
    ref.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["backbone.layers.3.mixer.experts.4.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"experts\.4\.up_proj"):
        load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu", kernels="torch"))
