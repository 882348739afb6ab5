"""CUDA-graph decode equals eager decode: logits, greedy tokens and states, for batches that fill a
bucket and batches padded to the next one; padding rows write only the padding slot 0.

The graph tests need CUDA (skipped cleanly without it); the bucket ladder is plain Python.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rnnserve.engine.cuda_graph import batch_size_ladder
from rnnserve.models.base import DecodeBatch, RecurrentLM
from tests.models.harness import alloc_states, prefill_in_chunks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
NUM_SLOTS = 12  # slot 0 (padding) + 11 sequences; the ladder tops out at 8


def test_batch_size_ladder() -> None:
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(8) == [1, 2, 4, 8]
    assert batch_size_ladder(12) == [1, 2, 4, 8, 12]
    assert batch_size_ladder(256)[-3:] == [64, 128, 256]
    with pytest.raises(ValueError):
        batch_size_ladder(0)


def _mamba():
    from transformers import MambaConfig

    return MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=200, state_size=16, expand=2, conv_kernel=4)


def _mamba2():
    from transformers import Mamba2Config

    return Mamba2Config(
        hidden_size=64, num_hidden_layers=2, vocab_size=200, num_heads=8, head_dim=16, state_size=16, chunk_size=16
    )


def _rwkv4():
    from transformers import RwkvConfig

    return RwkvConfig(hidden_size=64, num_hidden_layers=2, vocab_size=200, attention_hidden_size=64)


FAMILIES = [
    pytest.param("rnnserve.models.mamba", _mamba, id="mamba"),
    pytest.param("rnnserve.models.mamba2", _mamba2, id="mamba2"),
    pytest.param("rnnserve.models.rwkv4", _rwkv4, id="rwkv4"),
]


def _load(hf_model_dir, make_config, backend: str, dtype: str) -> RecurrentLM:
    from rnnserve.config import ModelConfig
    from rnnserve.models.loader import load_model

    folder, _ = hf_model_dir(make_config(), jitter=0.02)
    return load_model(ModelConfig(model=str(folder), dtype=dtype, device="cuda", kernels=backend)).model


def _clone(states):
    return [{k: v.clone() for k, v in layer.items()} for layer in states]


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("module", "make_config"), FAMILIES)
def test_graph_decode_equals_eager(hf_model_dir, module, make_config, backend) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not there")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from rnnserve.engine.cuda_graph import CUDAGraphDecoder

    model = _load(hf_model_dir, make_config, backend, "float32")
    dev = model.device
    eager_states = alloc_states(model, NUM_SLOTS)
    prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((1, 5, 9, 2, 13, 4, 7, 3, 6, 11, 8))]
    with torch.inference_mode():
        prefill_in_chunks(model, eager_states, prompts, list(range(1, NUM_SLOTS)), None)
    graph_states = _clone(eager_states)
    graphs = CUDAGraphDecoder(model, graph_states, max_batch_size=8)
    graphs.capture(progress=False)
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    # Capture and warm-up touched only the padding slot.
    for layer_g, layer_e in zip(graph_states, eager_states):
        for name in layer_g:
            assert torch.equal(layer_g[name][1:], layer_e[name][1:]), name

    gen = torch.Generator().manual_seed(0)
    tokens = {s: int(t) for s, t in zip(range(NUM_SLOTS), torch.randint(10, 200, (NUM_SLOTS,), generator=gen))}
    # Batch sizes 1, 3 (padded to 4), 4, 5 (padded to 8), 8, 11 (eager: above the ladder); slots out of order.
    steps = [[7], [3, 9, 1], [2, 11, 5, 4], [10, 6, 8, 1, 3], [1, 2, 3, 4, 5, 6, 7, 8], list(range(11, 0, -1))]
    with torch.inference_mode():
        for step, slots in enumerate(steps):
            batch = DecodeBatch(
                input_ids=torch.tensor([tokens[s] for s in slots], device=dev),
                positions=torch.tensor([20 + step] * len(slots), device=dev),
                slot_ids=torch.tensor(slots, device=dev),
            )
            before = _clone(graph_states)
            eager = model.decode(batch, eager_states)
            fast = graphs(batch)
            torch.testing.assert_close(fast, eager, atol=1e-4, rtol=1e-4)
            assert torch.equal(fast.argmax(-1), eager.argmax(-1))
            for layer_g, layer_e, layer_b in zip(graph_states, eager_states, before):
                for name in layer_g:
                    torch.testing.assert_close(layer_g[name][1:], layer_e[name][1:], atol=1e-4, rtol=1e-4)
                    # Slots outside the batch (other than the padding slot) are untouched.
                    idle = [s for s in range(1, NUM_SLOTS) if s not in slots]
                    assert torch.equal(layer_g[name][idle], layer_b[name][idle]), name
            for s, row in zip(slots, fast):
                tokens[s] = int(row.argmax())


@needs_cuda
def test_graph_decode_bf16_runs_and_matches_eager_tokens(hf_model_dir) -> None:
    """bfloat16 Mamba on the Triton kernels: graph replay reproduces eager decode's tokens."""
    from rnnserve.engine.cuda_graph import CUDAGraphDecoder

    model = _load(hf_model_dir, _mamba, "triton", "bfloat16")
    dev = model.device
    eager_states = alloc_states(model, NUM_SLOTS)
    graph_states = _clone(eager_states)
    graphs = CUDAGraphDecoder(model, graph_states, max_batch_size=4)
    graphs.capture(progress=False)
    batch = DecodeBatch(
        input_ids=torch.tensor([5, 17, 33], device=dev),
        positions=torch.zeros(3, dtype=torch.long, device=dev),
        slot_ids=torch.tensor([4, 2, 9], device=dev),
    )
    with torch.inference_mode():
        for _ in range(4):
            eager = model.decode(batch, eager_states)
            fast = graphs(batch)
            torch.testing.assert_close(fast, eager, atol=2e-2, rtol=2e-2)
            batch.input_ids = eager.argmax(-1)
