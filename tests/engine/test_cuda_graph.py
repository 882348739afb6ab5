"""CUDA-graph decode equals eager decode: logits, greedy tokens and states, for batches that fill a
bucket and batches padded to the next one; padding rows write only the padding slot 0.

The graph tests need CUDA (skipped cleanly without it); the bucket ladder and the padding logic
also run on the CPU, with captured graphs emulated by eager replays on the same static buffers.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rnnserve.engine.cuda_graph import CUDAGraphDecoder, batch_size_ladder
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


def _rwkv7(folder: Path) -> None:
    """fla-layout RWKV-7 (no transformers class), written by the model tests' own writer."""
    from safetensors.torch import save_file

    from tests.models import test_rwkv7 as t

    folder.mkdir(parents=True)
    save_file(t._to_fla(t._blinkdl_state_dict(seed=0)), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(t._fla_config()))


def _retnet(folder: Path) -> None:
    from tests.models import test_retnet as t

    config = t.fla_config()
    t.save_folder(folder, config, t.fla_state_dict(config))


FAMILIES = [
    pytest.param("rnnserve.models.mamba", _mamba, id="mamba"),
    pytest.param("rnnserve.models.mamba2", _mamba2, id="mamba2"),
    pytest.param("rnnserve.models.rwkv4", _rwkv4, id="rwkv4"),
    pytest.param("rnnserve.models.rwkv7", _rwkv7, id="rwkv7"),
    pytest.param("rnnserve.models.retnet", _retnet, id="retnet"),
]


def _load(hf_model_dir, tmp_path: Path, make, backend: str, dtype: str) -> RecurrentLM:
    """``make`` is a transformers config factory, or a writer of a checkpoint folder."""
    from rnnserve.config import ModelConfig
    from rnnserve.models.loader import load_model

    if make in (_rwkv7, _retnet):
        folder = tmp_path / "ckpt"
        make(folder)
    else:
        folder, _ = hf_model_dir(make(), jitter=0.02)
    return load_model(ModelConfig(model=str(folder), dtype=dtype, device="cuda", kernels=backend)).model


def _clone(states):
    return [{k: v.clone() for k, v in layer.items()} for layer in states]


class _EagerReplay:
    """Stands in for a captured graph on the CPU: replay() reruns the decode on the static inputs."""

    def __init__(self, graphs: CUDAGraphDecoder, size: int) -> None:
        self.graphs, self.size = graphs, size

    def replay(self) -> None:
        g = self.graphs
        g.outputs[self.size].copy_(g.model.decode(g._static_batch(self.size), g.states))


def _emulated(model: RecurrentLM, states, max_batch_size: int) -> CUDAGraphDecoder:
    graphs = CUDAGraphDecoder(model, states, max_batch_size)
    vocab = model.vocab_size
    for size in graphs.buckets:
        graphs.outputs[size] = torch.empty(size, vocab, dtype=torch.float32, device=model.device)
        graphs.graphs[size] = _EagerReplay(graphs, size)  # type: ignore[assignment]
    return graphs


def _check_against_eager(model: RecurrentLM, make_graphs, atol: float = 1e-4) -> None:
    """Graph decode == eager decode over steps of batch 1, 3 (padded to 4), 4, 5 (padded to 8), 8 and
    11 (above the ladder: eager), slots out of order; padding writes nothing but slot 0."""
    dev = model.device
    eager_states = alloc_states(model, NUM_SLOTS)
    prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((1, 5, 9, 2, 13, 4, 7, 3, 6, 11, 8))]
    with torch.inference_mode():
        prefill_in_chunks(model, eager_states, prompts, list(range(1, NUM_SLOTS)), None)
    graph_states = _clone(eager_states)
    graphs = make_graphs(model, graph_states)
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    # Capture and warm-up touched only the padding slot.
    for layer_g, layer_e in zip(graph_states, eager_states):
        for name in layer_g:
            assert torch.equal(layer_g[name][1:], layer_e[name][1:]), name

    gen = torch.Generator().manual_seed(0)
    draws = torch.randint(10, model.vocab_size, (NUM_SLOTS,), generator=gen)
    tokens = {s: int(t) for s, t in zip(range(NUM_SLOTS), draws)}
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
            torch.testing.assert_close(fast, eager, atol=atol, rtol=atol)
            assert torch.equal(fast.argmax(-1), eager.argmax(-1))
            idle = [s for s in range(1, NUM_SLOTS) if s not in slots]
            for layer_g, layer_e, layer_b in zip(graph_states, eager_states, before):
                for name in layer_g:
                    torch.testing.assert_close(layer_g[name][1:], layer_e[name][1:], atol=atol, rtol=atol)
                    assert torch.equal(layer_g[name][idle], layer_b[name][idle]), name
            for s, row in zip(slots, fast):
                tokens[s] = int(row.argmax())


def test_bucket_padding_logic_on_cpu(hf_model_dir, tmp_path) -> None:
    """The bucket choice, padding with slot 0 and output slicing, with graphs emulated by eager
    replays on the static buffers (runs everywhere)."""
    if importlib.util.find_spec("rnnserve.models.mamba") is None:
        pytest.skip("rnnserve.models.mamba is not there")
    from rnnserve.config import ModelConfig
    from rnnserve.models.loader import load_model

    folder, _ = hf_model_dir(_mamba(), jitter=0.02)
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    _check_against_eager(model, lambda m, st: _emulated(m, st, 8), atol=1e-5)
    graphs = _emulated(model, alloc_states(model, 3), 8)
    assert [graphs.bucket_for(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    with pytest.raises(ValueError, match="CUDA"):
        graphs.capture()


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("module", "make_config"), FAMILIES)
def test_graph_decode_equals_eager(hf_model_dir, tmp_path, module, make_config, backend) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not there")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    model = _load(hf_model_dir, tmp_path, make_config, backend, "float32")

    def capture(m: RecurrentLM, states) -> CUDAGraphDecoder:
        graphs = CUDAGraphDecoder(m, states, max_batch_size=8)
        graphs.capture(progress=False)
        return graphs

    _check_against_eager(model, capture)


@needs_cuda
def test_graph_decode_bf16_runs_and_matches_eager_tokens(hf_model_dir, tmp_path) -> None:
    """bfloat16 Mamba on the Triton kernels: graph replay reproduces eager decode's tokens."""
    model = _load(hf_model_dir, tmp_path, _mamba, "triton", "bfloat16")
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
