"""Each family on the Triton kernels (``--kernels triton``) equals itself on the torch kernels: the
models call the Triton functions with the arguments, layouts and strides they give the references.

Tiny models; a packed prefill of two prompts on slots (2, 1), then decode steps of the pair. Runs
natively on CUDA, in a child process under TRITON_INTERPRET=1 on the CPU (see triton_util)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rnnserve.models.base import DecodeBatch, RecurrentLM
from tests.kernels.triton_util import import_triton_module, run_module_under_interpreter, triton_device
from tests.models.harness import alloc_states, assert_states_close, prefill_in_chunks

DEV = triton_device()
PROMPTS = [[5, 9, 2, 7, 3], [11, 4, 8, 1, 6, 13, 2, 9, 10]]
SLOTS = [2, 1]


def test_under_triton_interpreter() -> None:
    run_module_under_interpreter(__file__)


def _mamba(folder: Path) -> None:
    from transformers import MambaConfig

    from tests.conftest import build_random_hf_model

    cfg = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8, expand=2, conv_kernel=4)
    build_random_hf_model(cfg, jitter=0.02).save_pretrained(folder)


def _mamba2(folder: Path) -> None:
    from transformers import Mamba2Config

    from tests.conftest import build_random_hf_model

    cfg = Mamba2Config(
        hidden_size=32, num_hidden_layers=2, vocab_size=64, num_heads=4, head_dim=16, state_size=16, n_groups=2
    )
    build_random_hf_model(cfg, jitter=0.02).save_pretrained(folder)


def _rwkv7(folder: Path) -> None:
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
    pytest.param("rnnserve.models.rwkv7", _rwkv7, id="rwkv7"),
    pytest.param("rnnserve.models.retnet", _retnet, id="retnet"),
]


def _load(folder: Path, kernels: str) -> RecurrentLM:
    from rnnserve.config import ModelConfig
    from rnnserve.models.loader import load_model

    return load_model(ModelConfig(model=str(folder), dtype="float32", device=str(DEV), kernels=kernels)).model


@pytest.mark.parametrize(("module", "write"), FAMILIES)
def test_family_triton_equals_torch(tmp_path, module, write) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not there")
    for name in ("causal_conv1d", "selective_scan", "linear_recurrence", "wkv7"):
        import_triton_module(f"rnnserve.kernels.{name}.chunk_triton")
    folder = tmp_path / "ckpt"
    write(folder)
    ref, fast = _load(folder, "torch"), _load(folder, "triton")
    ref_states, fast_states = alloc_states(ref, 3), alloc_states(fast, 3)
    with torch.inference_mode():
        ref_logits = prefill_in_chunks(ref, ref_states, PROMPTS, SLOTS, None)
        fast_logits = prefill_in_chunks(fast, fast_states, PROMPTS, SLOTS, None)
        torch.testing.assert_close(fast_logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert_states_close(fast_states, ref_states, atol=1e-4, rtol=1e-4)
        tokens = ref_logits.argmax(-1)
        for step in range(3):
            batch = DecodeBatch(
                input_ids=tokens,
                positions=torch.tensor([len(p) + step for p in PROMPTS], device=DEV),
                slot_ids=torch.tensor(SLOTS, device=DEV),
            )
            ref_logits, fast_logits = ref.decode(batch, ref_states), fast.decode(batch, fast_states)
            torch.testing.assert_close(fast_logits, ref_logits, atol=1e-4, rtol=1e-4)
            assert_states_close(fast_states, ref_states, atol=1e-4, rtol=1e-4)
            tokens = ref_logits.argmax(-1)
