"""The fused Mamba-2 decode (``FusedMamba2Decoder``: a C++ ``Mamba2Model`` holding the weights and the
state pools) on the shapes its conv paths split on, against the torch decode: a width-4 conv whose B/C
channels (2GN = 20) leave a tail past the 8-channel vector blocks, and a width-3 conv (the scalar conv
for every channel); logits within 1e-4 of the largest, the same greedy tokens and the same states
(1e-4) at batch 1, 3 (out of order) and 5 (odd, with a slot twice decoded before). Also: a state pool
that swaps a layer's tensors is followed (the C++ model is rebound), the ``mamba2_decode`` op (the
per-call form the benchmark's baseline uses) equals the decoder, and untouched slots stay
bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from rnnserve.config import ModelConfig
from rnnserve.engine.cpu_decode import FusedMamba2Decoder, fused_decoder
from rnnserve.kernels import cpu_decode
from rnnserve.models.base import DecodeBatch, RecurrentLM
from rnnserve.models.loader import load_model
from tests.models.harness import alloc_states, assert_states_close, prefill_in_chunks

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")

NUM_SLOTS = 12
STEPS = [[4], [9, 1, 6], [11, 4, 2, 9, 7], [6]]


def _model(tmp_path_factory, conv_kernel: int, state_size: int) -> RecurrentLM:
    from transformers import Mamba2Config

    from tests.conftest import build_random_hf_model

    cfg = Mamba2Config(
        hidden_size=32,
        num_hidden_layers=2,
        vocab_size=67,
        num_heads=4,
        head_dim=16,
        state_size=state_size,
        n_groups=1,
        expand=2,
        conv_kernel=conv_kernel,
        time_step_limit=(0.0, float("inf")),
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp(f"mamba2_k{conv_kernel}_n{state_size}")
    build_random_hf_model(cfg, jitter=0.05).save_pretrained(folder)
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model


@pytest.fixture(scope="module", params=[(4, 10), (3, 16)], ids=["conv4-bc-tail", "conv3-scalar"])
def model(request, tmp_path_factory) -> RecurrentLM:
    return _model(tmp_path_factory, *request.param)


def _prefilled(model: RecurrentLM):
    states = alloc_states(model, NUM_SLOTS)
    slots = list(range(1, NUM_SLOTS))
    prompts = [[3 + (s * 5 + i) % 60 for i in range(1 + s % 5)] for s in slots]
    prefill_in_chunks(model, states, prompts, slots, 2)
    return states


def _clone(states):
    return [{k: v.clone() for k, v in layer.items()} for layer in states]


def _batch(slots: list[int], step: int) -> DecodeBatch:
    return DecodeBatch(
        input_ids=torch.tensor([(7 + 3 * s + 11 * step) % 67 for s in slots]),
        positions=torch.zeros(len(slots), dtype=torch.long),
        slot_ids=torch.tensor(slots),
    )


@torch.inference_mode()
def test_fused_mamba2_equals_torch(model: RecurrentLM) -> None:
    ref_states = _prefilled(model)
    fused_states = _clone(ref_states)
    fused = fused_decoder(model, fused_states)
    assert isinstance(fused, FusedMamba2Decoder)
    for step, slots in enumerate(STEPS):
        batch = _batch(slots, step)
        ref = model.decode(batch, ref_states)
        got = fused(batch)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert_states_close(fused_states, ref_states, atol=1e-4, rtol=1e-4)
    for a, b in zip(fused_states, ref_states):  # slots 0, 3, 5, 8, 10 were in no step
        for name in a:
            for s in (0, 3, 5, 8, 10):
                assert torch.equal(a[name][s], b[name][s])


@torch.inference_mode()
def test_fused_mamba2_follows_a_swapped_pool(model: RecurrentLM) -> None:
    """The pool replaces layer 1's tensors between steps: the next step reads and writes the new ones."""
    ref_states = _prefilled(model)
    fused_states = _clone(ref_states)
    fused = fused_decoder(model, fused_states)
    fused(_batch([2, 7], 0))
    model.decode(_batch([2, 7], 0), ref_states)
    old = {k: v.clone() for k, v in fused_states[1].items()}
    stale = fused_states[1]
    fused_states[1] = {k: v.clone() for k, v in stale.items()}
    got = fused(_batch([7, 4], 1))
    ref = model.decode(_batch([7, 4], 1), ref_states)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    assert_states_close(fused_states, ref_states, atol=1e-4, rtol=1e-4)
    for name in stale:
        assert torch.equal(stale[name], old[name])


@torch.inference_mode()
def test_mamba2_decode_op_equals_the_decoder(model: RecurrentLM) -> None:
    states_a = _prefilled(model)
    states_b = _clone(states_a)
    fused = fused_decoder(model, states_a)
    batch = _batch([9, 1, 6], 0)
    got = fused(batch)
    a = fused.args
    op = fused.ops.mamba2_decode(
        batch.input_ids, batch.slot_ids, a["emb"], a["norm_w"], a["in_w"], a["in_b"], a["conv_w"], a["conv_b"],
        a["dt_bias"], a["A"], a["D"], a["gnorm_w"], a["out_w"], a["out_b"], [st["conv"] for st in states_b],
        [st["ssm"] for st in states_b], fused.norm_f, fused.head_w, fused.head_kn, fused.eps, *fused.dims,
    )  # fmt: skip
    assert torch.equal(got, op)
    for x, y in zip(states_a, states_b):
        for name in x:
            assert torch.equal(x[name], y[name])
