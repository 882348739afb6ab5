"""``--cpu-decode fused`` for RWKV-4, RWKV-7, RetNet and DenseRetNet equals the torch decode (the
reference): logits within 1e-4 of the largest logit, the same greedy tokens and the same states (1e-4),
at batch 1, 3 and 33 on out-of-order slots whose states a chunked prefill left (resumed states),
positions carried on per sequence (RetNet rotates by them). RWKV-4: attention size != hidden size,
large keys. RWKV-7: LN0, an untied head, two heads of 64. RetNet: fla retention with grouped k/v heads
and a tied head; torchscale retention (interleaved rotation, the abs_sum normaliser riding in an extra
state column) with swish feature maps. DenseRetNet and DenseMamba (a MambaLM subclass, which the
Mamba-1 kernels would get wrong): a dense window of two layers. Slots no step
touched stay bit-identical; a slot outside the pool or repeated in a step is refused before anything
is written. With every linear layer int8 (``Int8Linear``, per-channel scales): the fused step (int8
panels, fp32 activations and state) equals the torch decode of the dequantized weights to the same
tolerances; so it does after each family's own ``quantize_int8`` (int8 and float32 panels mixed).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rnnserve.config import ModelConfig, RunnerConfig, StatePoolConfig
from rnnserve.engine.cpu_decode import fused_decoder, unsupported_reason
from rnnserve.engine.cpu_decode_families import (
    FusedDenseMambaDecoder,
    FusedDenseRetNetDecoder,
    FusedRetNetDecoder,
    FusedRwkv4Decoder,
    FusedRwkv7Decoder,
)
from rnnserve.engine.runner import ModelRunner
from rnnserve.engine.state_pool import StatePool
from rnnserve.kernels import cpu_decode
from rnnserve.models.base import DecodeBatch, RecurrentLM
from rnnserve.models.layers import quantize_int8
from rnnserve.models.loader import load_model
from tests.models import test_dense_mamba, test_dense_retnet, test_retnet, test_rwkv4, test_rwkv7
from tests.models.harness import alloc_states, assert_states_close, prefill_in_chunks
from tests.models.test_int8_families import dequantized

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")

NUM_SLOTS = 40
# Each step's slots: batch 1, 3 and 33, out of order, some sequences resumed from earlier steps.
STEPS = [[7], [30, 2, 11], list(range(39, 6, -1)), [2, 39, 7], [5]]
VOCAB = 97  # both test models' vocabulary


def _load(path) -> RecurrentLM:
    return load_model(ModelConfig(model=str(path), dtype="float32", device="cpu", kernels="torch")).model


@pytest.fixture(scope="module")
def rwkv4(tmp_path_factory) -> RecurrentLM:
    """Attention size 40 != hidden size 48, large keys (the running max matters)."""
    pth = tmp_path_factory.mktemp("rwkv4_fused") / "RWKV-4-random.pth"
    torch.save(test_rwkv4._hf_to_blinkdl(test_rwkv4._random_model(40, seed=6).state_dict()), pth)
    return _load(pth)


@pytest.fixture(scope="module")
def rwkv7(tmp_path_factory) -> RecurrentLM:
    folder = tmp_path_factory.mktemp("rwkv7_fused")
    pth = folder / "RWKV-x070-random.pth"
    torch.save(test_rwkv7._blinkdl_state_dict(seed=3), pth)
    return _load(pth)


@pytest.fixture(scope="module")
def retnet_fla(tmp_path_factory) -> RecurrentLM:
    c = test_retnet.fla_config(num_kv_heads=2, tie_word_embeddings=True)
    return _load(test_retnet.save_folder(tmp_path_factory.mktemp("retnet_fla"), c, test_retnet.fla_state_dict(c, 4)))


@pytest.fixture(scope="module")
def retnet_torchscale(tmp_path_factory) -> RecurrentLM:
    c = test_retnet.fla_config(retention_style="torchscale", feature_map="swish", hidden_size=48, num_heads=3)
    folder = tmp_path_factory.mktemp("retnet_ts")
    return _load(test_retnet.save_folder(folder, c, test_retnet.fla_state_dict(c, 5)))


@pytest.fixture(scope="module")
def dense_retnet(tmp_path_factory) -> RecurrentLM:
    """Three layers and a window of two earlier layers (layer 1 sees a zero for the missing one)."""
    c = test_dense_retnet.dense_config(dense_block_layers=2)
    folder = tmp_path_factory.mktemp("dense_retnet_fused")
    return _load(test_dense_retnet.save_folder(folder, c, test_dense_retnet.dense_state_dict(c, 7)))


@pytest.fixture(scope="module")
def dense_mamba(tmp_path_factory) -> RecurrentLM:
    """A DenseMambaLM (a MambaLM subclass) with a window of two layers over three layers."""
    folder = test_dense_mamba.dense_folder(tmp_path_factory.mktemp("dense_mamba_fused"), m=2, vocab_size=VOCAB)[0]
    return test_dense_mamba.load(folder)


def _prefilled_states(model: RecurrentLM) -> tuple[list, dict[int, int]]:
    """Slots 1..39 hold prompts of 1-12 tokens, prefilled in chunks of 3; slot 0 is padding. Returns the
    states and each slot's next position."""
    states = alloc_states(model, NUM_SLOTS)
    slots = list(range(1, NUM_SLOTS))
    prompts = [[3 + (s * 7 + i) % 90 for i in range(1 + s % 12)] for s in slots]
    prefill_in_chunks(model, states, prompts, slots, 3)
    return states, {s: len(p) for s, p in zip(slots, prompts)}


FAMILIES = ["rwkv4", "rwkv7", "retnet_fla", "retnet_torchscale", "dense_retnet", "dense_mamba"]


def _int8_pair(model: RecurrentLM) -> tuple[RecurrentLM, RecurrentLM]:
    """Two copies of ``model``: every ``nn.Linear`` swapped for its ``Int8Linear``, and the float32 model
    whose linear layers hold those int8 layers' dequantized weights (q * scale; a tied head untied, the
    embedding keeps its float32 weight), the reference of the fused int8 step."""
    int8, dequantized = copy.deepcopy(model), copy.deepcopy(model)
    for mq, mr in zip(list(int8.modules()), list(dequantized.modules())):
        for name, child in list(mq.named_children()):
            if isinstance(child, nn.Linear):
                q = quantize_int8(child)
                setattr(mq, name, q)
                ref = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
                ref.weight.data = q.qweight.float() * q.scale[:, None]
                if q.bias is not None:
                    ref.bias.data = q.bias.clone()
                setattr(mr, name, ref)
    return int8, dequantized


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_fused_decode_equals_torch(family: str, weights: str, request) -> None:
    model: RecurrentLM = request.getfixturevalue(family)
    fused_model = model
    if weights == "int8":
        fused_model, model = _int8_pair(model)
    ref_states, position = _prefilled_states(model)
    fused_states = [{k: v.clone() for k, v in layer.items()} for layer in ref_states]
    fused = fused_decoder(fused_model, fused_states)
    expected = {
        "rwkv4": FusedRwkv4Decoder,
        "rwkv7": FusedRwkv7Decoder,
        "dense_retnet": FusedDenseRetNetDecoder,
        "dense_mamba": FusedDenseMambaDecoder,
    }
    assert isinstance(fused, expected.get(family, FusedRetNetDecoder))
    assert fused.head.dtype == (torch.int8 if weights == "int8" else torch.float32)  # the packed head's panels
    next_token = {s: 5 + s % (VOCAB - 5) for s in range(NUM_SLOTS)}
    for slots in STEPS:
        batch = _batch(slots, next_token, position)
        ref = model.decode(batch, ref_states)
        got = fused(batch)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        for s, row in zip(slots, ref):
            next_token[s] = int(row.argmax())
            position[s] += 1
    assert_states_close(fused_states, ref_states, atol=1e-4, rtol=1e-4)
    # Untouched slots (0 and 1 were in no step) are bit-identical.
    for a, b in zip(fused_states, ref_states):
        for name in a:
            assert torch.equal(a[name][:2], b[name][:2])


def _batch(slots: list[int], next_token: dict[int, int], position: dict[int, int]) -> DecodeBatch:
    """One decode step of ``slots``, each feeding its next token at its position."""
    return DecodeBatch(
        input_ids=torch.tensor([next_token[s] for s in slots]),
        positions=torch.tensor([position[s] for s in slots]),
        slot_ids=torch.tensor(slots),
    )


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_fused_decode_of_quantize_int8(family: str, request) -> None:
    """``--quantization int8`` as served: the family's own ``quantize_int8`` (int8 projections and head,
    some matrices left float32: a step mixing int8 and float32 panels). The fused step equals the torch
    decode of the dequantized weights to 1e-4 of the largest logit with the same greedy tokens and states;
    against the torch int8 decode (``Int8Linear`` through fbgemm, which also rounds each activation row to
    7 bits) its logits are within 30% of the largest logit (the bound of tests/models/test_int8_families.py)."""
    int8 = copy.deepcopy(request.getfixturevalue(family))
    int8.quantize_int8()
    ref_model = dequantized(int8)
    ref_states, position = _prefilled_states(ref_model)
    fused_states = [{k: v.clone() for k, v in layer.items()} for layer in ref_states]
    torch_states = [{k: v.clone() for k, v in layer.items()} for layer in ref_states]
    fused = fused_decoder(int8, fused_states)
    assert fused.head.dtype == torch.int8
    next_token = {s: 5 + s % (VOCAB - 5) for s in range(NUM_SLOTS)}
    for slots in STEPS:
        batch = _batch(slots, next_token, position)
        ref, got, torch_int8 = ref_model.decode(batch, ref_states), fused(batch), int8.decode(batch, torch_states)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        assert float((got - torch_int8).abs().max()) <= 0.3 * float(ref.abs().max())
        for s, row in zip(slots, ref):
            next_token[s] = int(row.argmax())
            position[s] += 1
    assert_states_close(fused_states, ref_states, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["rwkv4", "rwkv7", "retnet_fla"])
@torch.inference_mode()
def test_bad_slots_are_refused_before_any_write(family: str, request) -> None:
    model: RecurrentLM = request.getfixturevalue(family)
    states = alloc_states(model, 4)
    for layer in states:
        for t in layer.values():
            t.normal_()
    before = [{k: v.clone() for k, v in layer.items()} for layer in states]
    fused = fused_decoder(model, states)
    ids, pos = torch.tensor([3, 5]), torch.tensor([4, 4])
    with pytest.raises(RuntimeError, match="slot id 4 out of range"):
        fused(DecodeBatch(ids, pos, torch.tensor([1, 4])))
    with pytest.raises(RuntimeError, match="slot id 2 appears twice"):
        fused(DecodeBatch(ids, pos, torch.tensor([2, 2])))
    for a, b in zip(states, before):
        for name in a:
            assert torch.equal(a[name], b[name])


def test_runner_picks_the_fused_decoder(retnet_fla) -> None:
    pool = StatePool(retnet_fla.state_specs(), StatePoolConfig(max_num_seqs=4), torch.device("cpu"))
    assert isinstance(ModelRunner(retnet_fla, pool, RunnerConfig(cpu_decode="fused"))._decoder, FusedRetNetDecoder)
    assert not isinstance(ModelRunner(retnet_fla, pool, RunnerConfig())._decoder, FusedRetNetDecoder)


def test_non_float32_model_is_refused(rwkv7) -> None:
    half = _load_like(rwkv7).to(torch.bfloat16)
    assert "float32" in str(unsupported_reason(half, alloc_states(half, 2)))


def _load_like(model: RecurrentLM) -> RecurrentLM:
    clone = type(model)(model.cfg)
    clone.load_state_dict(model.state_dict())
    return clone
