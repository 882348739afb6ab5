"""The runner's step metadata: a prefill reads the host copies the runner built (``cu_seqlens_cpu``,
the chunk layouts cached on the batch's ``Varlen``); no layer copies a tensor back to the host."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnserve.config import ModelConfig
from rnnserve.models.base import PrefillBatch
from rnnserve.models.loader import load_model
from tests.kernels.test_models_triton import _mamba, _mamba2, _retnet, _rwkv7
from tests.models.harness import alloc_states, prefill_batch


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
