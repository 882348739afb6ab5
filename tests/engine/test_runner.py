"""The runner's step: a prefill reads the host copies the runner built (``cu_seqlens_cpu``, the chunk
layouts cached on the batch's ``Varlen``), no layer copies a tensor back to the host; a step with decodes
and prompt chunks is one ``mixed`` pass that reads each weight once and equals the separate calls."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rnnserve.config import ModelConfig
from rnnserve.models.base import DecodeBatch, MixedBatch, PrefillBatch, RecurrentLM, States
from rnnserve.models.loader import load_model
from tests.kernels.test_models_triton import _mamba, _mamba2, _retnet, _rwkv7
from tests.models.harness import alloc_states, assert_states_close, prefill_batch, prefill_in_chunks


def _rwkv4(folder: Path) -> None:
    from tests.models.test_rwkv4 import _random_model

    _random_model(attention_hidden_size=48, seed=0).save_pretrained(folder)


WRITERS = {"mamba": _mamba, "mamba2": _mamba2, "rwkv4": _rwkv4, "rwkv7": _rwkv7, "retnet": _retnet}


def _no_host_copy(*args: object, **kwargs: object) -> None:
    raise AssertionError("a layer copied a tensor to the host during the step")


@pytest.mark.parametrize("family", [*WRITERS, "dense_mamba"])
def test_prefill_uses_the_runner_host_metadata(tmp_path, monkeypatch, family) -> None:
    if family == "dense_mamba":
        from tests.models.test_dense_mamba import dense_folder

        folder, _, _ = dense_folder(tmp_path, m=2)
    else:
        folder = tmp_path / "ckpt"
        WRITERS[family](folder)
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    # Three sequences of 1, 40 and 70 tokens: several chunks for every chunked kernel (32 or 64 tokens).
    seqs = [[3], [(7 * i) % 50 + 1 for i in range(40)], [(5 * i) % 50 + 1 for i in range(70)]]
    batch = prefill_batch(seqs, [3, 1, 2], [0, 0, 0], model.device)
    ref_states, states = alloc_states(model, 4), alloc_states(model, 4)
    with torch.inference_mode():
        ref = model.prefill(prefill_batch(seqs, [3, 1, 2], [0, 0, 0], model.device), ref_states)
        monkeypatch.setattr(torch.Tensor, "tolist", _no_host_copy)
        monkeypatch.setattr(torch.Tensor, "item", _no_host_copy)
        out = model.prefill(batch, states)
        monkeypatch.undo()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # Every chunked kernel found its layout on the batch, built once for all the layers.
    assert all(size in (32, 64) for size in batch.varlen._layouts)


def test_prefill_batch_checks_the_host_copy() -> None:
    with pytest.raises(ValueError, match="cu_seqlens_cpu"):
        PrefillBatch(
            input_ids=torch.tensor([1, 2]),
            positions=torch.tensor([0, 1]),
            cu_seqlens=torch.tensor([0, 2], dtype=torch.int32),
            slot_ids=torch.tensor([1]),
            logits_indices=torch.tensor([1]),
            cu_seqlens_cpu=(0, 1, 2),
        )


class _MatmulReads(TorchFunctionMode):
    """Counts, per weight, the matrix products that read it (a weight is identified by its storage,
    so a transposed or column-major view of it counts as the same weight)."""

    MATMULS = {F.linear, torch.mm, torch.matmul, torch.addmm, torch.bmm, torch.Tensor.mm, torch.Tensor.matmul}

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.names = {  # every linear layer's weight (the head's is the embedding's when tied)
            m.weight.untyped_storage().data_ptr(): n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
        }
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MATMULS:
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.names:
                    self.counts[self.names[a.untyped_storage().data_ptr()]] += 1
        return func(*args, **kwargs)


def _load(tmp_path: Path, family: str) -> RecurrentLM:
    folder = tmp_path / family
    WRITERS[family](folder)
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model


def _mixed_setup(model: RecurrentLM, num_decodes: int) -> tuple[States, MixedBatch]:
    """States where ``num_decodes`` sequences (slots 1..n) have a 5-token prompt and two sequences
    (slots n+1, n+2) have the first 9 tokens of theirs; then a mixed step: one decode token each for
    the first, the next chunk (resumed from the slot's state) for the other two."""
    n = num_decodes
    states = alloc_states(model, n + 3)
    prompts = [[(3 * i + j) % 50 + 1 for j in range(5)] for i in range(n)]
    chunked = [[(11 * i + 5 * j) % 50 + 1 for j in range(12 + 40 * i)] for i in range(2)]
    with torch.inference_mode():
        logits = prefill_in_chunks(model, states, prompts, list(range(1, n + 1)), None)
        prefill_in_chunks(model, states, [c[:9] for c in chunked], [n + 1, n + 2], None)
    decode = DecodeBatch(input_ids=logits.argmax(-1), positions=torch.full((n,), 5), slot_ids=torch.arange(1, n + 1))
    prefill = prefill_batch([c[9:] for c in chunked], [n + 1, n + 2], [9, 9], model.device)
    return states, MixedBatch.pack(decode, prefill)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_mixed_step_reads_each_weight_once(tmp_path, family) -> None:
    model = _load(tmp_path, family)
    states, batch = _mixed_setup(model, 3)
    one_pass, two_passes = _MatmulReads(model), _MatmulReads(model)
    with torch.inference_mode():
        with one_pass:
            model.mixed(batch, copy_states(states))
        with two_passes:
            RecurrentLM.mixed(model, batch, copy_states(states))  # the interface's default: decode, then prefill
    assert set(one_pass.counts) == set(one_pass.names.values())  # every matrix is read (the head too)
    assert all(c == 1 for c in one_pass.counts.values()), one_pass.counts
    assert all(c == 2 for c in two_passes.counts.values()), two_passes.counts


@pytest.mark.parametrize("num_decodes", [1, 3, 33])
@pytest.mark.parametrize("family", ["mamba", "mamba2", "rwkv7"])
def test_mixed_step_equals_decode_and_prefill(tmp_path, family, num_decodes) -> None:
    """One pass == the separate decode and prefill calls: logits within 1e-5, states too, greedy tokens
    equal (rwkv7 runs the interface's two-pass default)."""
    model = _load(tmp_path, family)
    states, batch = _mixed_setup(model, num_decodes)
    ref_states = copy_states(states)
    with torch.inference_mode():
        out = model.mixed(batch, states)
        ref = torch.cat([model.decode(batch.decode, ref_states), model.prefill(batch.prefill, ref_states)])
    assert out.shape == (num_decodes + 2, model.vocab_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert_states_close(states, ref_states, atol=1e-5, rtol=1e-5)


def copy_states(states: States) -> States:
    return [{k: v.clone() for k, v in layer.items()} for layer in states]
