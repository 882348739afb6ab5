"""Zamba2 (Mamba-2 layers + shared transformer blocks) against transformers' Zamba2ForCausalLM: logits
and greedy tokens with 2 shared blocks run at 3 hybrid positions (first and last layer), adapters,
RoPE and odd head counts, and with GQA; a prefill resumed after decode steps; the shared checks
(chunked prefill, batch == alone); and the checkpoint's tied shared-block tensors, deduplicated by
save_pretrained or written at every position."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from rnnserve.config import ModelConfig
from rnnserve.models.loader import ModelLoadError, load_model
from rnnserve.models.zamba2 import Zamba2LM
from tests.models import harness

if not hasattr(transformers, "Zamba2Config"):
    pytest.skip(f"transformers {transformers.__version__} has no Zamba2", allow_module_level=True)

VOCAB = 97


def _config(gqa: bool = False) -> transformers.Zamba2Config:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=30,
        intermediate_size=44,
        mamba_d_state=8,
        mamba_d_conv=3,
        chunk_size=16,
        adapter_rank=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.15,  # peaked logits, so greedy ties cannot flip on rounding
    )
    if gqa:  # 6 heads over 2 KV heads (head_dim 10), no adapters (transformers' need MHA), no RoPE
        return transformers.Zamba2Config(
            **common,
            num_hidden_layers=4,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            num_attention_heads=6,
            num_key_value_heads=2,
            n_mamba_heads=6,
            mamba_ngroups=2,
            num_mem_blocks=1,
            use_shared_attention_adapter=False,
            use_mem_rope=False,
            hidden_act="gelu_pytorch_tanh",
            tie_word_embeddings=False,
        )
    # 3 attention heads of 20 (2D / 3), 5 Mamba heads; 2 shared blocks over 3 hybrid positions (block 0
    # runs at layers 0 and 4), adapters on q/k/v and the MLP, RoPE.
    return transformers.Zamba2Config(
        **common,
        num_hidden_layers=5,
        layers_block_type=["hybrid", "mamba", "hybrid", "mamba", "hybrid"],
        num_attention_heads=3,
        n_mamba_heads=5,
        num_mem_blocks=2,
        use_shared_attention_adapter=True,
        use_mem_rope=True,
    )


def _save(folder: Path, gqa: bool = False, seed: int = 0) -> torch.nn.Module:
    from tests.conftest import build_random_hf_model

    ref = build_random_hf_model(_config(gqa), transformers.Zamba2ForCausalLM, seed=seed, jitter=0.05)
    ref.generation_config.eos_token_id = None  # greedy over every token, EOS included, as ours
    ref.save_pretrained(folder)
    return ref


def _load(folder: Path) -> Zamba2LM:
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    assert isinstance(model, Zamba2LM)
    return model


@pytest.fixture(scope="module")
def zamba2(tmp_path_factory) -> tuple[torch.nn.Module, Zamba2LM, Path]:
    folder = tmp_path_factory.mktemp("zamba2")
    ref = _save(folder)
    return ref, _load(folder), folder


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def _check_against_transformers(ref: torch.nn.Module, ours: Zamba2LM, prompt: list[int], steps: int) -> None:
    ref_logits = ref(torch.tensor([prompt])).logits[0].float()  # [T, V]
    states = harness.alloc_states(ours, 3)
    batch = harness.prefill_batch([prompt], [2], [0], ours.device, all_logits=True, states=states)
    torch.testing.assert_close(ours.prefill(batch, states), ref_logits, atol=1e-4, rtol=1e-4)
    ref_out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert harness.greedy_generate(ours, prompt, steps) == ref_out
    assert harness.greedy_generate(ours, prompt, steps, chunk=5) == ref_out


def test_logits_and_greedy_match_transformers(zamba2) -> None:
    ref, ours, _ = zamba2
    cfg = ours.cfg
    assert cfg.hybrid_layer_indices == (0, 2, 4) and cfg.head_dim == 20 and len(ours.model.blocks) == 2
    _check_against_transformers(ref, ours, _prompt(37), steps=20)


def test_gqa_without_adapters_matches_transformers(tmp_path: Path) -> None:
    ref = _save(tmp_path, gqa=True, seed=1)
    ours = _load(tmp_path)
    assert (ours.cfg.num_heads, ours.cfg.num_kv_heads, ours.cfg.head_dim) == (6, 2, 10)
    assert not ours.cfg.rope and not ours.cfg.tie_word_embeddings
    _check_against_transformers(ref, ours, _prompt(29, seed=1), steps=12)


@torch.no_grad()
def test_prefill_resumed_after_decode_steps_matches_transformers(zamba2) -> None:
    """A second prompt chunk after decode steps (a conversation's next turn) continues every Mamba
    state and every hybrid position's KV cache: its logits are transformers' over the whole text."""
    ref, ours, _ = zamba2
    first, turn = _prompt(19, seed=5), _prompt(11, seed=6)
    states = harness.alloc_states(ours, 4)
    logits = harness.prefill_in_chunks(ours, states, [first], [3], None)[0]
    text = list(first)
    for _ in range(4):
        tok = int(logits.argmax())
        text.append(tok)
        logits = ours.decode(harness.decode_batch([tok], [len(text) - 1], [3], ours.device, states), states)[0]
    batch = harness.prefill_batch([turn], [3], [len(text)], ours.device, all_logits=True, states=states)
    resumed = ours.prefill(batch, states)
    full = ref(torch.tensor([text + turn])).logits[0, len(text) :].float()
    torch.testing.assert_close(resumed, full, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_batching(zamba2) -> None:
    _, model, _ = zamba2
    harness.check_chunked_prefill(model, _prompt(29, seed=3), chunk_sizes=(1, 5, 16))
    harness.check_batch_equals_alone(model, [_prompt(n, seed=n) for n in (1, 17, 30)])


def test_engine_serves_it_and_preemption_keeps_the_greedy_tokens(zamba2) -> None:
    """Through the engine (mixed steps, every layer a state slot, each hybrid position KV blocks): under
    a budget of 12 blocks decodes run out and the youngest requests are preempted and recomputed, and
    every request still gets the tokens the model alone gives."""
    from tests.engine.test_engine import tokens
    from tests.engine.test_engine_kv import _prompts, _run, make_engine

    _, model, _ = zamba2
    prompts = _prompts(model, [9, 5, 7, 3])
    engine = make_engine(model, blocks=12)
    out = _run(engine, prompts, 16)
    assert engine.stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert tokens(out[f"r{i}"]) == harness.greedy_generate(model, p, 16)


def test_prefix_cache_hit_restores_states_and_kv_blocks(zamba2) -> None:
    """A next turn that resends the first hits the prefix cache (every layer's state snapshot and
    each hybrid position's KV blocks, 18 tokens: a partial block copied) and gets the tokens and
    logprobs of the cache-off engine."""
    from tests.engine.test_engine import tokens
    from tests.engine.test_prefix_cache_kv import (
        assert_blocks_accounted,
        assert_same,
        cold,
        make_engine,
        prompt_of,
        run,
    )

    _, model, _ = zamba2
    engine = make_engine(model, cache=True)
    turn1 = prompt_of(model, 13, 1)
    turn2 = turn1 + tokens(run(engine, turn1, "t1")) + prompt_of(model, 5, 2)
    hit = run(engine, turn2, "t2")
    assert hit[-1].num_cached_tokens == 18
    assert_same(hit, cold(model, turn2))
    assert_blocks_accounted(engine)


def test_every_layer_keeps_mamba_state_and_each_hybrid_position_its_kv(zamba2) -> None:
    _, model, _ = zamba2
    specs = model.state_specs()
    assert [[s.name for s in layer] for layer in specs] == [["conv", "ssm"]] * 5
    kv = model.kv_specs()
    assert [(s.num_kv_heads, s.head_dim) for s in kv] == [(3, 20)] * 3  # one per hybrid position


def test_tied_copies_of_shared_blocks_load_and_must_agree(zamba2, tmp_path: Path) -> None:
    """save_pretrained writes a shared block once (under its first hybrid layer); a checkpoint that
    writes it at every hybrid layer loads to the same model; copies that differ are refused."""
    ref, ours, folder = zamba2
    saved = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith("model.layers.4.shared_transformer.") for k in saved)  # tied to layer 0's
    full = {k: v.clone() for k, v in ref.state_dict().items()}  # every position's copy, untied on disk
    assert any(k.startswith("model.layers.4.shared_transformer.") for k in full)
    for f in ("config.json", "generation_config.json"):
        (tmp_path / f).write_text((folder / f).read_text())
    save_file(full, str(tmp_path / "model.safetensors"))
    again = _load(tmp_path)
    for (name, a), (_, b) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name

    full["model.layers.4.shared_transformer.self_attn.q_proj.weight"] += 0.01
    save_file(full, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="copies of this shared-block tensor differ"):
        _load(tmp_path)


def test_config_errors() -> None:
    cfg = _config().to_dict()
    with pytest.raises(ValueError, match="use_shared_attention_adapter"):
        Zamba2LM.from_hf_config({**cfg, "num_key_value_heads": 1}, backend="torch")
    with pytest.raises(ValueError, match="layers_block_type"):
        Zamba2LM.from_hf_config({**cfg, "layers_block_type": ["hybrid", "attention"] + ["mamba"] * 3}, backend="torch")
    with pytest.raises(ValueError, match="hidden_act"):
        Zamba2LM.from_hf_config({**cfg, "hidden_act": "relu2"}, backend="torch")
