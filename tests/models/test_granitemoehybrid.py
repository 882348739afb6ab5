"""Granite 4.0-H (GraniteMoeHybridForCausalLM) against transformers: logits and greedy tokens for
the MoE and the dense variant, with and without RoPE, multipliers away from 1, attention layers
first and last; the shared checks; and the grouped MoE against a per-token loop."""

from __future__ import annotations

import pytest
import torch
import transformers

from rnnserve.config import ModelConfig
from rnnserve.models.granitemoehybrid import GraniteMoeHybridLM
from rnnserve.models.loader import load_model
from rnnserve.models.moe import moe_forward
from tests.models import harness

if not hasattr(transformers, "GraniteMoeHybridConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no GraniteMoeHybrid", allow_module_level=True)

VOCAB = 89


def _config(experts: int, rope: bool) -> transformers.GraniteMoeHybridConfig:
    return transformers.GraniteMoeHybridConfig(
        vocab_size=VOCAB,
        hidden_size=36,
        intermediate_size=20,
        shared_intermediate_size=28,
        num_hidden_layers=4,
        layer_types=["attention", "mamba", "mamba", "attention"],
        num_attention_heads=3,
        num_key_value_heads=1,
        num_local_experts=experts,
        num_experts_per_tok=2 if experts else 0,
        mamba_n_heads=6,
        mamba_d_head=12,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_d_conv=3,
        mamba_chunk_size=16,
        position_embedding_type="rope" if rope else None,
        embedding_multiplier=1.7,
        residual_multiplier=0.6,
        attention_multiplier=0.2,
        logits_scaling=1.3,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.15,
    )


def _pair(tmp_path, experts: int, rope: bool) -> tuple[torch.nn.Module, GraniteMoeHybridLM]:
    from tests.conftest import build_random_hf_model

    ref = build_random_hf_model(_config(experts, rope), transformers.GraniteMoeHybridForCausalLM, jitter=0.05)
    ref.save_pretrained(tmp_path)
    model = load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu", kernels="torch")).model
    assert isinstance(model, GraniteMoeHybridLM)
    return ref, model


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
@pytest.mark.parametrize(("experts", "rope"), [(4, False), (0, True)])
def test_logits_and_greedy_match_transformers(tmp_path, experts: int, rope: bool) -> None:
    ref, ours = _pair(tmp_path, experts, rope)
    assert ours.cfg.attn_layer_indices == (0, 3) and ours.cfg.num_experts == experts
    prompt = _prompt(33)
    ref_logits = ref(torch.tensor([prompt])).logits[0].float()
    states = harness.alloc_states(ours, 3)
    batch = harness.prefill_batch([prompt], [2], [0], ours.device, all_logits=True, states=states)
    torch.testing.assert_close(ours.prefill(batch, states), ref_logits, atol=1e-4, rtol=1e-4)
    steps = 16
    ref.generation_config.eos_token_id = None  # greedy over every token, EOS included, as ours
    ref_out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert harness.greedy_generate(ours, prompt, steps, chunk=5) == ref_out


def test_chunked_prefill_and_batching(tmp_path) -> None:
    _, model = _pair(tmp_path, 4, False)
    harness.check_chunked_prefill(model, _prompt(29, seed=3), chunk_sizes=(1, 7, 64))
    harness.check_batch_equals_alone(model, [_prompt(n, seed=n) for n in (1, 12, 25)])


def test_grouped_moe_equals_a_per_token_loop() -> None:
    g = torch.Generator().manual_seed(0)
    n, d, inter, e, k = 23, 8, 6, 5, 2
    x, router = torch.randn(n, d, generator=g), torch.randn(e, d, generator=g)
    w_in, w_out = torch.randn(e, 2 * inter, d, generator=g), torch.randn(e, d, inter, generator=g)
    out = moe_forward(x, router, w_in, w_out, k)
    for t in range(n):
        logits = router @ x[t]
        top = logits.topk(k)
        w = torch.softmax(top.values, 0)
        expect = sum(
            w[j] * (w_out[ex] @ (torch.nn.functional.silu((w_in[ex] @ x[t])[:inter]) * (w_in[ex] @ x[t])[inter:]))
            for j, ex in enumerate(top.indices.tolist())
        )
        torch.testing.assert_close(out[t], expect, atol=1e-5, rtol=1e-5)
