"""``--quantization int8`` for RWKV-4, RWKV-7, RetNet (fla and torchscale), DenseRetNet and DenseMamba.

Each family's ``quantize_int8`` swaps its projection matrices and head for ``Int8Linear`` (per-channel
scales) and keeps the rest float32 (the list per family is in its docstring and ``INT8_LAYERS`` here).
Loaded through the loader with ``quantization="int8"`` on tiny random-weight models:

- the torch int8 path's logits (a chunked prefill of 9 prompts, then 6 decode steps on fixed tokens) are
  within 30% of the largest float32 logit (max |int8 - fp32| <= 0.3 * max |fp32|; measured 7-24%):
  ``Int8Linear``'s torch forward (fbgemm) also quantizes each activation row to 7 bits, which these
  tiny random models, 2-3 layers deep with sharp logits, amplify;
- the int8 weights alone (the dequantized weights with float32 activations: what the fused int8 step
  computes) give logits within 10% (measured 3-8%);
- greedy tokens are not asserted equal to float32's: on these random models the top-2 logit gaps
  (0.3-6% of the largest logit) are below the int8 error, so argmaxes flip;
- the engine serves the int8 model with ``--cpu-decode fused`` (the fused decoder picked, int8 panels)
  and with the torch decode, and generates the requested tokens.

The fused int8 step against the torch decode is tested in tests/engine/test_cpu_decode_families.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from rnnserve.config import ModelConfig, RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import LLMEngine, SamplingParams
from rnnserve.kernels import cpu_decode
from rnnserve.models.base import RecurrentLM
from rnnserve.models.layers import Int8Linear
from rnnserve.models.loader import load_model
from tests.models import test_dense_mamba, test_dense_retnet, test_retnet, test_rwkv4, test_rwkv7
from tests.models.harness import alloc_states, decode_batch, prefill_in_chunks

# max |int8 - fp32| logit as a fraction of the largest fp32 logit (see the module docstring)
TOL_TORCH = 0.3
TOL_WEIGHTS = 0.1

# The module paths each family's quantize_int8 makes Int8Linear (layer 1 where layers differ).
INT8_LAYERS = {
    "rwkv4": ["blocks.1.att.key", "blocks.1.att.value", "blocks.1.att.receptance", "blocks.1.att.output",
              "blocks.1.ffn.key", "blocks.1.ffn.receptance", "blocks.1.ffn.value", "head"],
    "rwkv7": ["blocks.1.att.receptance", "blocks.1.att.key", "blocks.1.att.value", "blocks.1.att.output",
              "blocks.1.ffn.key", "blocks.1.ffn.value", "head"],
    "retnet_fla": ["model.layers.1.attn.q_proj", "model.layers.1.attn.k_proj", "model.layers.1.attn.v_proj",
                   "model.layers.1.attn.o_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                   "model.layers.1.mlp.down_proj", "lm_head"],
    "retnet_torchscale": ["model.layers.1.attn.q_proj", "model.layers.1.attn.o_proj", "lm_head"],
    "dense_retnet": ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                     "model.layers.1.self_attn.to_hidden.0", "model.layers.1.self_attn.to_out.0", "lm_head"],
    "dense_mamba": ["backbone.layers.1.mixer.in_proj", "backbone.layers.1.mixer.out_proj", "lm_head"],
}  # fmt: skip
# Kept float32 on purpose (small matrices that make decays / gates, or the dense selection MLPs).
FP32_LAYERS = {
    "rwkv7": ["blocks.1.att.w_lora.down", "blocks.1.att.a_lora.up", "blocks.1.att.g_lora.down"],
    "dense_retnet": ["model.layers.1.self_attn.k_select.fc1"],
    "dense_mamba": ["backbone.layers.1.mixer.x_proj", "backbone.layers.1.mixer.y_select.fc1"],
}
FAMILIES = list(INT8_LAYERS)


def _folder(family: str, tmp: Path) -> Path:
    """The same tiny random-weight checkpoints as tests/engine/test_cpu_decode_families.py."""
    if family == "rwkv4":
        pth = tmp / "RWKV-4-random.pth"
        torch.save(test_rwkv4._hf_to_blinkdl(test_rwkv4._random_model(40, seed=6).state_dict()), pth)
        return pth
    if family == "rwkv7":
        pth = tmp / "RWKV-x070-random.pth"
        torch.save(test_rwkv7._blinkdl_state_dict(seed=3), pth)
        return pth
    if family == "retnet_fla":
        c = test_retnet.fla_config(num_kv_heads=2, tie_word_embeddings=True)
        return test_retnet.save_folder(tmp, c, test_retnet.fla_state_dict(c, 4))
    if family == "retnet_torchscale":
        c = test_retnet.fla_config(retention_style="torchscale", feature_map="swish", hidden_size=48, num_heads=3)
        return test_retnet.save_folder(tmp, c, test_retnet.fla_state_dict(c, 5))
    if family == "dense_retnet":
        c = test_dense_retnet.dense_config(dense_block_layers=2)
        return test_dense_retnet.save_folder(tmp, c, test_dense_retnet.dense_state_dict(c, 7))
    return test_dense_mamba.dense_folder(tmp, m=2, vocab_size=97)[0]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory) -> tuple[str, RecurrentLM, RecurrentLM]:
    """(family, the float32 model, the same checkpoint loaded with quantization="int8")."""
    path = _folder(request.param, tmp_path_factory.mktemp(request.param))
    cfg = dict(model=str(path), dtype="float32", device="cpu", kernels="torch")
    return (
        request.param,
        load_model(ModelConfig(**cfg)).model,
        load_model(ModelConfig(**cfg, quantization="int8")).model,
    )


def test_the_projections_and_head_are_int8(pair) -> None:
    family, fp32, int8 = pair
    modules = dict(int8.named_modules())
    for name in INT8_LAYERS[family]:
        q = modules[name]
        assert isinstance(q, Int8Linear), name
        w = dict(fp32.named_modules())[name].weight
        # Per-channel scales: every row within half a step of its float32 weights.
        assert ((q.qweight.float() * q.scale[:, None] - w).abs() <= q.scale[:, None] / 2 + 1e-6).all(), name
    for name in FP32_LAYERS.get(family, []):
        assert isinstance(modules[name], torch.nn.Linear), name
    # The embedding stays float32 (a tied head's int8 copy does not replace the lookup table).
    emb = [m for m in int8.modules() if isinstance(m, torch.nn.Embedding)]
    assert emb and all(e.weight.dtype == torch.float32 for e in emb)


def _prompts() -> list[list[int]]:
    return [[(7 * i + 3 * b) % 90 + 5 for i in range(3 + 2 * b)] for b in range(9)]


@torch.inference_mode()
def _prefill_and_decode(model: RecurrentLM, steps: int) -> list[torch.Tensor]:
    """Logits [9, V] after a chunked prefill of the 9 prompts, then after each of ``steps`` decode steps
    fed with fixed tokens (the same inputs for both models, whatever their argmax)."""
    prompts = _prompts()
    slots = list(range(1, 10))
    states = alloc_states(model, 10)
    out = [prefill_in_chunks(model, states, prompts, slots, 4)]
    pos = [len(p) for p in prompts]
    for step in range(steps):
        tokens = [5 + (s * 11 + step * 5) % 90 for s in slots]
        out.append(model.decode(decode_batch(tokens, pos, slots, model.device, states), states))
        pos = [p + 1 for p in pos]
    return out


def test_int8_logits_close_to_fp32(pair) -> None:
    _, fp32, int8 = pair
    for ref, got in zip(_prefill_and_decode(fp32, 6), _prefill_and_decode(int8, 6)):
        assert float((got - ref).abs().max()) <= TOL_TORCH * float(ref.abs().max())


def dequantized(model: RecurrentLM) -> RecurrentLM:
    """A copy of an int8 model whose ``Int8Linear`` layers are float32 ``nn.Linear`` holding the
    dequantized weights (q * scale): what the fused int8 step computes (fp32 activations)."""
    out = copy.deepcopy(model)
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Int8Linear):
                ref = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                ref.weight.data = child.qweight.float() * child.scale[:, None]
                if child.bias is not None:
                    ref.bias.data = child.bias.clone()
                setattr(module, name, ref)
    return out


def test_int8_weights_alone_close_to_fp32(pair) -> None:
    _, fp32, int8 = pair
    for ref, got in zip(_prefill_and_decode(fp32, 6), _prefill_and_decode(dequantized(int8), 6)):
        assert float((got - ref).abs().max()) <= TOL_WEIGHTS * float(ref.abs().max())


@pytest.mark.parametrize("cpu_decode_mode", ["fused", "torch"])
def test_engine_serves_the_int8_model(pair, cpu_decode_mode: str) -> None:
    family, _, int8 = pair
    if cpu_decode_mode == "fused" and cpu_decode.unavailable_reason() is not None:
        pytest.skip("no AVX2/FMA on this CPU")
    engine = LLMEngine(
        int8,
        StatePoolConfig(max_num_seqs=4),
        SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=4),
        RunnerConfig(cpu_decode=cpu_decode_mode),
        eos_token_id=None,
    )
    decoder = engine.runner._decoder
    if cpu_decode_mode == "fused":
        assert getattr(decoder, "head", None) is not None and decoder.head.dtype == torch.int8, family
    for i, prompt in enumerate(_prompts()[:3]):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    got: dict[str, list[int]] = {}
    for _ in range(100):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert sorted(got) == ["0", "1", "2"] and all(len(t) == 6 for t in got.values())
