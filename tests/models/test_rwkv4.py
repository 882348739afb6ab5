"""RWKV-4 against transformers' RwkvForCausalLM (batch 1) and the ``rwkv`` package (a BlinkDL-named
``.pth``), both with the same random weights loaded through our loader, plus the shared family checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import RwkvConfig, RwkvForCausalLM

from rnnserve.config import ModelConfig
from rnnserve.models import registry
from rnnserve.models.loader import load_model
from rnnserve.models.rwkv4 import Rwkv4LM
from tests.models import harness

VOCAB = 131
PROMPT_LEN = 41
STEPS = 64

# BlinkDL name fragment -> transformers name fragment (the inverse of the model's renames).
_TO_HF = (
    (".att.", ".attention."),
    (".ffn.", ".feed_forward."),
    (".ln0.", ".pre_ln."),
    ("time_mix_k", "time_mix_key"),
    ("time_mix_v", "time_mix_value"),
    ("time_mix_r", "time_mix_receptance"),
)


def _hf_to_blinkdl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        new = name.removeprefix("rwkv.").replace("embeddings.", "emb.")
        for blink, hf in _TO_HF:
            new = new.replace(hf, blink)
        out[new] = t.clone()
    return out


def _random_model(attention_hidden_size: int, seed: int) -> RwkvForCausalLM:
    cfg = RwkvConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        attention_hidden_size=attention_hidden_size,
        intermediate_size=72,
        num_hidden_layers=2,
        context_length=1024,
        rescale_every=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = RwkvForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("attention.key.weight"):
                p.mul_(10.0)  # large keys: e^k spans many orders of magnitude
            if name.endswith("head.weight"):
                p.mul_(5.0)  # peaked logits, so greedy ties cannot flip on rounding
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[RwkvForCausalLM, Path, Path]:
    """Random RWKV-4 weights saved as an HF folder (returned with the in-memory RwkvForCausalLM) and
    other random weights as a BlinkDL ``.pth``. Returns (reference model, folder, pth file)."""
    root = tmp_path_factory.mktemp("rwkv4")
    model = _random_model(48, seed=0)
    folder = root / "hf"
    model.save_pretrained(folder)
    pth_dir = root / "pth"
    pth_dir.mkdir()
    pth = pth_dir / "RWKV-4-random.pth"
    torch.save(_hf_to_blinkdl(_random_model(48, seed=3).state_dict()), pth)
    return model, folder, pth


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory) -> Rwkv4LM:
    """Attention size 40 != hidden size 48: neither reference can run it (both size their states by the
    hidden size), so it is checked for self-consistency only."""
    pth = tmp_path_factory.mktemp("rwkv4_odd") / "odd.pth"
    torch.save(_hf_to_blinkdl(_random_model(40, seed=4).state_dict()), pth)
    return load_model(ModelConfig(model=str(pth), dtype="float32", device="cpu")).model


def _prompt() -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()


@torch.no_grad()
def _ours_all_logits(model: Rwkv4LM, prompt: list[int]) -> torch.Tensor:
    states = harness.alloc_states(model, 2)
    batch = harness.prefill_batch([prompt], [1], [0], model.device, all_logits=True)
    return model.prefill(batch, states)


def test_registry_and_sniffer(checkpoints) -> None:
    _, folder, pth = checkpoints
    hf_cfg = json.loads((folder / "config.json").read_text())
    assert registry.resolve_class(hf_cfg) is Rwkv4LM
    cfg = registry.config_from_state_dict(torch.load(pth, weights_only=True))
    assert registry.resolve_class(cfg) is Rwkv4LM
    assert (cfg["hidden_size"], cfg["attention_hidden_size"], cfg["intermediate_size"]) == (48, 48, 72)
    assert (cfg["num_hidden_layers"], cfg["vocab_size"]) == (2, VOCAB)


@torch.no_grad()
def test_matches_transformers(checkpoints) -> None:
    ref, folder, _ = checkpoints
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu")).model
    prompt = _prompt()
    ids = torch.tensor([prompt])
    out = ref(ids, use_cache=True)
    torch.testing.assert_close(_ours_all_logits(model, prompt), out.logits[0].float(), atol=1e-4, rtol=1e-4)

    # Greedy decode: transformers one token at a time from its state, ours via prefill + decode.
    state = out.state
    tok = int(out.logits[0, -1].argmax())
    ref_tokens = []
    for _ in range(STEPS):
        ref_tokens.append(tok)
        step = ref(torch.tensor([[tok]]), state=state, use_cache=True)
        state = step.state
        tok = int(step.logits[0, -1].argmax())
    assert harness.greedy_generate(model, prompt, STEPS) == ref_tokens
    assert harness.greedy_generate(model, prompt, STEPS, chunk=7) == ref_tokens


_RWKV_RUNNER = """
import sys, torch
from rwkv.model import RWKV
path, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompt = [int(t) for t in sys.argv[4].split(",")]
model = RWKV(model=path, strategy="cpu fp32")
logits, state = model.forward(prompt, None, full_output=True)
tokens, step_logits = [], []
tok = int(logits[-1].argmax())
for _ in range(steps):
    tokens.append(tok)
    step, state = model.forward([tok], state)
    step_logits.append(step.clone())
    tok = int(step.argmax())
torch.save({"logits": logits, "tokens": tokens, "step_logits": torch.stack(step_logits)}, out)
"""


def run_rwkv_package(pth: Path, prompt: list[int], steps: int, out: Path, *, v7: bool) -> dict:
    """Run the ``rwkv`` package in a subprocess: its behaviour is chosen by environment variables read
    at import (RWKV_V7_ON switches the whole module), which must not leak into other tests."""
    env = {**os.environ, "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", "RWKV_V7_ON": "1" if v7 else "0"}
    # v7 appends ".pth" to the name itself; v4 accepts either.
    name = str(pth.with_suffix("")) if v7 else str(pth)
    args = [sys.executable, "-c", _RWKV_RUNNER, name, str(out), str(steps), ",".join(map(str, prompt))]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@torch.no_grad()
def test_matches_rwkv_package(checkpoints, tmp_path) -> None:
    _, _, pth = checkpoints
    model = load_model(ModelConfig(model=str(pth), dtype="float32", device="cpu")).model
    assert isinstance(model, Rwkv4LM)
    prompt = _prompt()
    ref = run_rwkv_package(pth, prompt, STEPS, tmp_path / "ref.pt", v7=False)
    torch.testing.assert_close(_ours_all_logits(model, prompt), ref["logits"].float(), atol=1e-4, rtol=1e-4)
    assert harness.greedy_generate(model, prompt, STEPS) == ref["tokens"]


@pytest.mark.parametrize("which", ["hf", "odd"])
def test_chunked_prefill_and_batch(checkpoints, odd_model, which) -> None:
    folder = checkpoints[1]
    model = odd_model if which == "odd" else load_model(ModelConfig(model=str(folder), dtype="float32")).model
    prompt = _prompt()
    harness.check_chunked_prefill(model, prompt)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 17, 40, 5)]
    harness.check_batch_equals_alone(model, prompts)


def test_state_specs(odd_model) -> None:
    specs = odd_model.state_specs()
    assert len(specs) == 2
    by_name = {s.name: s for s in specs[0]}
    assert by_name["att_x"].shape == (48,) and by_name["aa"].shape == (40,)
    assert by_name["pp"].fill == -1e30 and by_name["pp"].dtype == torch.float32


@torch.no_grad()
def test_bfloat16(checkpoints) -> None:
    """In bf16 the WKV decay and bonus stay fp32 (from the checkpoint's own values), the WKV state is
    fp32, and the output distribution stays near fp32's."""
    _, _, pth = checkpoints
    bf = load_model(ModelConfig(model=str(pth), dtype="bfloat16", device="cpu")).model
    ref = load_model(ModelConfig(model=str(pth), dtype="float32", device="cpu")).model
    assert bf.dtype == torch.bfloat16
    raw = torch.load(pth, weights_only=True)["blocks.1.att.time_decay"]
    assert bf.blocks[1].att.w.dtype == torch.float32
    torch.testing.assert_close(bf.blocks[1].att.w, -torch.exp(raw.float()), atol=0, rtol=0)
    specs = {s.name: s.dtype for s in bf.state_specs()[0]}
    assert specs == {
        "att_x": torch.bfloat16,
        "aa": torch.float32,
        "bb": torch.float32,
        "pp": torch.float32,
        "ffn_x": torch.bfloat16,
    }
    prompt = _prompt()
    p_bf = _ours_all_logits(bf, prompt).softmax(-1)
    p_32 = _ours_all_logits(ref, prompt).softmax(-1)
    # Keys of ~±30 carry bf16's 0.4% rounding into the exponents, so single probabilities move by a few
    # percent; a broken bf16 path (e.g. a bf16 WKV state) moves them by tens of percent.
    assert (p_bf - p_32).abs().max() < 0.2
    assert (p_bf - p_32).abs().mean() < 2e-3
