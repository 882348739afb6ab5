"""RWKV-7 against the ``rwkv`` package (RWKV_V7_ON=1, a random BlinkDL-named ``.pth``), the same weights
in the fla-hub HF layout equal to the ``.pth`` load, and the shared family checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rnnserve.config import ModelConfig
from rnnserve.models import registry
from rnnserve.models.loader import load_model
from rnnserve.models.rwkv7 import Rwkv7LM
from tests.models import harness
from tests.models.test_rwkv4 import run_rwkv_package

VOCAB = 97
HIDDEN = 128
HEAD = 64  # fla's GroupNorm eps is head_dim * norm_eps; BlinkDL's is 64e-5: equal at head size 64
LAYERS = 2
FFN = 200
RANKS = {"w": 16, "a": 12, "v": 8, "g": 24}
PROMPT_LEN = 37
STEPS = 40


def _blinkdl_state_dict(seed: int, hidden: int = HIDDEN, head: int = HEAD) -> dict[str, torch.Tensor]:
    """Random RWKV-7 weights with BlinkDL's names and shapes, at scales that keep every part of the
    maths active (decays spread over (e^-0.61, 1), gates neither 0 nor 1, peaked logits)."""
    g = torch.Generator().manual_seed(seed)

    def n(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    d, h = hidden, hidden // head
    sd = {"emb.weight": n(VOCAB, d), "blocks.0.ln0.weight": n(d, std=0.1, mean=1), "blocks.0.ln0.bias": n(d, std=0.1)}
    for i in range(LAYERS):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[f"{b}{ln}.weight"] = n(d, std=0.1, mean=1)
            sd[f"{b}{ln}.bias"] = n(d, std=0.1)
        att = f"{b}att."
        for c in "rwkvag":
            sd[f"{att}x_{c}"] = u(1, 1, d)
        for kind in "wav":
            sd[f"{att}{kind}0"] = n(1, 1, d, std=1.5)
        for kind, rank in RANKS.items():
            sd[f"{att}{kind}1"] = n(d, rank, std=0.3)
            sd[f"{att}{kind}2"] = n(rank, d, std=0.3)
        sd[f"{att}k_k"] = n(1, 1, d, std=0.1, mean=0.8)
        sd[f"{att}k_a"] = n(1, 1, d, std=0.2, mean=1)
        sd[f"{att}r_k"] = n(h, head, std=0.3)
        for proj in ("receptance", "key", "value", "output"):
            sd[f"{att}{proj}.weight"] = n(d, d, std=d**-0.5)
        sd[f"{att}ln_x.weight"] = n(d, std=0.1, mean=1)
        sd[f"{att}ln_x.bias"] = n(d, std=0.1)
        sd[f"{b}ffn.x_k"] = u(1, 1, d)
        sd[f"{b}ffn.key.weight"] = n(FFN, d, std=d**-0.5)
        sd[f"{b}ffn.value.weight"] = n(d, FFN, std=FFN**-0.5)
    sd["ln_out.weight"] = n(d, std=0.1, mean=1)
    sd["ln_out.bias"] = n(d, std=0.1)
    sd["head.weight"] = n(VOCAB, d, std=3 * d**-0.5)
    return sd


def _to_fla(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under fla-hub's RWKV7ForCausalLM names and shapes."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue  # fla has no value-residual weights in layer 0
        new = name.replace("emb.", "model.embeddings.").replace("ln_out.", "model.norm.")
        new = new.replace("head.", "lm_head.").replace("blocks.", "model.layers.")
        for blink, fla in (
            (".ln0.", ".pre_norm."),
            (".ln1.", ".attn_norm."),
            (".ln2.", ".ffn_norm."),
            (".att.", ".attn."),
            (".receptance.", ".r_proj."),
            (".key.", ".k_proj.") if ".att." in name else ("", ""),
            (".value.", ".v_proj.") if ".att." in name else ("", ""),
            (".output.", ".o_proj."),
            (".ln_x.", ".g_norm."),
        ):
            if blink:
                new = new.replace(blink, fla)
        tail = new.rsplit(".", 1)
        if len(tail[1]) == 2 and tail[1][0] in "wavg" and tail[1][1] in "012":
            kind, part = tail[1]
            lora = f"{tail[0]}.{kind}_lora.lora"
            if part == "0":
                out[f"{lora}.2.bias"] = t.reshape(-1).clone()
            else:
                out[f"{lora}.{0 if part == '1' else 2}.weight"] = t.t().contiguous()
            continue
        if new.endswith(("attn.k_k", "attn.k_a", "ffn.x_k")):
            t = t.reshape(-1)
        out[new] = t.clone()
    return out


def _fla_config() -> dict:
    # fla's RWKV7Config field names.
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "attn_mode": "chunk",
        "hidden_size": HIDDEN,
        "hidden_ratio": 4,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "head_dim": HEAD,
        "num_heads": None,
        "decay_low_rank_dim": RANKS["w"],
        "gate_low_rank_dim": RANKS["g"],
        "a_low_rank_dim": RANKS["a"],
        "v_low_rank_dim": RANKS["v"],
        "hidden_act": "sqrelu",
        "max_position_embeddings": 2048,
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "attn": None,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "fuse_norm": True,
        "fuse_cross_entropy": True,
        "vocab_size": VOCAB,
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """(BlinkDL .pth file, fla-hub HF folder) holding the same random weights."""
    root = tmp_path_factory.mktemp("rwkv7")
    sd = _blinkdl_state_dict(seed=0)
    pth_dir = root / "pth"
    pth_dir.mkdir()
    pth = pth_dir / "RWKV-x070-random.pth"
    torch.save(sd, pth)
    folder = root / "fla"
    folder.mkdir()
    save_file(_to_fla(sd), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(_fla_config()))
    return pth, folder


@pytest.fixture(scope="module")
def model(checkpoints) -> Rwkv7LM:
    return load_model(ModelConfig(model=str(checkpoints[0]), dtype="float32", device="cpu")).model


def _prompt() -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()


@torch.no_grad()
def _all_logits(model: Rwkv7LM, prompt: list[int]) -> torch.Tensor:
    states = harness.alloc_states(model, 2)
    return model.prefill(harness.prefill_batch([prompt], [1], [0], model.device, all_logits=True), states)


def test_registry_and_sniffer(checkpoints) -> None:
    pth, folder = checkpoints
    assert registry.resolve_class(json.loads((folder / "config.json").read_text())) is Rwkv7LM
    cfg = registry.config_from_state_dict(torch.load(pth, weights_only=True))
    assert registry.resolve_class(cfg) is Rwkv7LM
    assert (cfg["hidden_size"], cfg["head_dim"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (
        HIDDEN,
        HEAD,
        LAYERS,
        VOCAB,
    )
    assert (cfg["decay_low_rank_dim"], cfg["a_low_rank_dim"], cfg["v_low_rank_dim"]) == (16, 12, 8)
    assert (cfg["gate_low_rank_dim"], cfg["intermediate_size"]) == (24, FFN)


@torch.no_grad()
def test_matches_rwkv_package(checkpoints, model, tmp_path) -> None:
    pth, _ = checkpoints
    prompt = _prompt()
    ref = run_rwkv_package(pth, prompt, STEPS, tmp_path / "ref.pt", v7=True)
    torch.testing.assert_close(_all_logits(model, prompt), ref["logits"].float(), atol=1e-4, rtol=1e-4)
    assert harness.greedy_generate(model, prompt, STEPS) == ref["tokens"]
    assert harness.greedy_generate(model, prompt, STEPS, chunk=5) == ref["tokens"]
    # The decode path's logits along the greedy continuation, step by step.
    states = harness.alloc_states(model, 2)
    harness.prefill_in_chunks(model, states, [prompt], [1], None)
    steps = harness.decode_one_by_one(model, states, ref["tokens"], 1, start=len(prompt))
    torch.testing.assert_close(steps, ref["step_logits"].float(), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_fla_layout_equals_pth(checkpoints, model) -> None:
    _, folder = checkpoints
    fla = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu")).model
    assert isinstance(fla, Rwkv7LM)
    assert fla.cfg == model.cfg
    for (name, p), (name2, q) in zip(model.named_parameters(), fla.named_parameters()):
        assert name == name2
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
    prompt = _prompt()
    torch.testing.assert_close(_all_logits(fla, prompt), _all_logits(model, prompt), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_fla_stacked_lerp_layout_equals_pth(checkpoints, model, tmp_path) -> None:
    """fla's first layout stacks the six lerp weights of a layer in one ``attn.x_x [6, 1, 1, D]``."""
    from safetensors.torch import load_file

    _, folder = checkpoints
    tensors = load_file(str(folder / "model.safetensors"))
    for i in range(LAYERS):
        prefix = f"model.layers.{i}.attn."
        lerps = [tensors.pop(f"{prefix}x_{c}").reshape(1, 1, HIDDEN) for c in "rwkvag"]
        tensors[f"{prefix}x_x"] = torch.stack(lerps)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    stacked = load_model(ModelConfig(model=str(tmp_path), dtype="float32", device="cpu")).model
    for (name, p), (_, q) in zip(model.named_parameters(), stacked.named_parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)


def test_chunked_prefill_and_batch(model) -> None:
    harness.check_chunked_prefill(model, _prompt(), chunk_sizes=(1, 2, 3, 7, 16, 64))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 17, 40, 5)]
    harness.check_batch_equals_alone(model, prompts)


def test_state_specs(model) -> None:
    specs = model.state_specs()
    assert len(specs) == LAYERS
    shapes = {s.name: (s.shape, s.dtype) for s in specs[0]}
    assert shapes == {
        "att_x": ((HIDDEN,), torch.float32),
        "wkv": ((HIDDEN // HEAD, HEAD, HEAD), torch.float32),
        "ffn_x": ((HIDDEN,), torch.float32),
    }


@torch.no_grad()
def test_bfloat16(checkpoints, model) -> None:
    """In bf16 the WKV state stays fp32 and the output distribution stays near fp32's."""
    bf = load_model(ModelConfig(model=str(checkpoints[0]), dtype="bfloat16", device="cpu")).model
    assert bf.dtype == torch.bfloat16
    specs = {s.name: s.dtype for s in bf.state_specs()[0]}
    assert specs == {"att_x": torch.bfloat16, "wkv": torch.float32, "ffn_x": torch.bfloat16}
    prompt = _prompt()
    p_bf, p_32 = _all_logits(bf, prompt).softmax(-1), _all_logits(model, prompt).softmax(-1)
    assert (p_bf - p_32).abs().max() < 0.2
    assert (p_bf - p_32).abs().mean() < 2e-3
