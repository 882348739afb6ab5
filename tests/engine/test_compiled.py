"""The CPU fast path (torch.compile'd decode) equals the eager decode: logits, greedy tokens and the
states of every slot, over steps of varying batch size (which exercise the batch-1 specialisation and
the dynamic-batch graph) on slots that are not 0..B-1.

Inductor compilation costs seconds per graph (it writes and builds C++), so one tiny Mamba is
compiled once (two graphs: batch 1 and the dynamic batch); the whole-model path is traced on the
engine's small fake model without Inductor.
"""

from __future__ import annotations

import pytest
import torch

from rnnserve.config import ModelConfig
from rnnserve.engine.compiled import CompiledDecoder, decode_units
from rnnserve.models.base import DecodeBatch, RecurrentLM
from rnnserve.models.loader import load_model
from tests.engine.fake_model import FakeRecurrentLM
from tests.models.harness import alloc_states, assert_states_close, prefill_in_chunks

pytest.importorskip("torch._inductor")

# (slots of the step's sequences): batch 1, 3, 2, 1, 4, with slots out of order.
STEPS = [[2], [5, 1, 3], [3, 5], [1], [4, 2, 5, 1]]


def _run(model: RecurrentLM, decode, states, steps=STEPS, seed: int = 0) -> list[torch.Tensor]:
    """Feed greedy tokens slot by slot through ``decode``; return each step's logits."""
    gen = torch.Generator().manual_seed(seed)
    next_token = {s: int(t) for s, t in zip(range(8), torch.randint(1, model.vocab_size, (8,), generator=gen))}
    pos = dict.fromkeys(range(8), 4)
    outs = []
    for slots in steps:
        batch = DecodeBatch(
            input_ids=torch.tensor([next_token[s] for s in slots]),
            positions=torch.tensor([pos[s] for s in slots]),
            slot_ids=torch.tensor(slots),
        )
        logits = decode(batch)
        outs.append(logits)
        for s, row in zip(slots, logits):
            next_token[s] = int(row.argmax())
            pos[s] += 1
    return outs


@pytest.fixture(scope="module")
def mamba(tmp_path_factory) -> RecurrentLM:
    from transformers import MambaConfig

    from tests.conftest import build_random_hf_model

    cfg = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=8, expand=2, conv_kernel=4)
    folder = tmp_path_factory.mktemp("mamba_compiled")
    build_random_hf_model(cfg, jitter=0.02).save_pretrained(folder)
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model


def _prefilled_states(model: RecurrentLM):
    """States of 6 slots with different prompts in slots 1..5 (slot 0 is padding)."""
    states = alloc_states(model, 6)
    prompts = [list(range(3, 3 + n)) for n in (1, 7, 2, 12, 5)]
    prefill_in_chunks(model, states, prompts, [1, 2, 3, 4, 5], None)
    return states


def test_decode_units_are_the_mixers(mamba) -> None:
    units = decode_units(mamba)
    assert units == [layer.mixer for layer in mamba.backbone.layers]
    assert decode_units(FakeRecurrentLM()) == []


@torch.inference_mode()
def test_compiled_decode_equals_eager(mamba) -> None:
    eager_states = _prefilled_states(mamba)
    compiled_states = [{k: v.clone() for k, v in layer.items()} for layer in eager_states]
    eager = _run(mamba, lambda b: mamba.decode(b, eager_states), eager_states)
    CompiledDecoder(mamba, compiled_states, backend="eager")  # an earlier decoder's wrappers are replaced
    compiled = CompiledDecoder(mamba, compiled_states)
    try:
        assert compiled.warmup() >= 0.0
        fast = _run(mamba, compiled, compiled_states)
    finally:
        compiled.restore()
    assert "decode" not in vars(mamba.backbone.layers[0].mixer)
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    # Slot 0 took the warm-up's writes; every real slot matches.
    real = [{k: v[1:] for k, v in layer.items()} for layer in compiled_states]
    ref = [{k: v[1:] for k, v in layer.items()} for layer in eager_states]
    assert_states_close(real, ref, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_whole_model_compile_equals_eager() -> None:
    """A family without decode units compiles its whole decode (traced by Dynamo and AOTAutograd;
    Inductor's own code generation is covered above, and costs seconds per graph)."""
    model = FakeRecurrentLM(vocab_size=50, hidden=8).eval()
    eager_states = alloc_states(model, 6)
    compiled_states = alloc_states(model, 6)
    eager = _run(model, lambda b: model.decode(b, eager_states), eager_states)
    compiled = CompiledDecoder(model, compiled_states, backend="aot_eager")
    compiled.warmup()
    fast = _run(model, compiled, compiled_states)
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    real = [{k: v[1:] for k, v in layer.items()} for layer in compiled_states]
    ref = [{k: v[1:] for k, v in layer.items()} for layer in eager_states]
    assert_states_close(real, ref, atol=1e-5, rtol=1e-5)
