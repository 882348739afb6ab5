"""DenseRetNet: the public DenseSSM config and names, an independent quadratic (parallel) form written
here (with the release's own parallel normalisation as well as the recurrent one), m = 0 equal to plain
RetNet with the same weights, and the shared chunked-prefill / batch consistency checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rnnserve.config import ModelConfig
from rnnserve.models.dense_retnet import DenseRetNetConfig, DenseRetNetLM
from rnnserve.models.loader import load_model
from rnnserve.models.registry import resolve_class
from rnnserve.models.retnet import RetNetConfig, RetNetLM
from tests.models import harness

VOCAB = 101


def dense_config(**overrides: object) -> dict:
    """The released 350M config.json, shrunk (same keys: LlamaConfig fields plus DenseSSM extras)."""
    c = {
        "auto_map": {"AutoModelForCausalLM": "modeling_dense_gau_retnet.LlamaForCausalLM"},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "query_key_dim": 32,
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": 2,
        "num_hidden_layers": 3,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-6,
        "layernorm_eps": 1e-5,
        "retnorm": False,
        "tie_word_embeddings": False,
        "use_cache": False,
        "vocab_size": VOCAB,
        "v_factor": 2,
        "dense_block_layers": 1,
        "dropout": 0.1,
        "deepnorm": False,
    }
    c.update(overrides)
    return c


def dense_state_dict(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release's names (every layer has the dense modules, as released)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + r(n, std=0.1)

    d, qk, h = c["hidden_size"], c["query_key_dim"], c["num_attention_heads"]
    e = d * c["v_factor"]
    sd = {"model.embed_tokens.weight": r(VOCAB, d, std=1.0), "model.norm.weight": norm(d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        sd.update(
            {
                p + "input_layernorm.weight": norm(d),
                a + "q_proj.weight": r(qk, d),
                a + "k_proj.weight": r(qk, d),
                a + "to_hidden.0.weight": r(2 * e, d),
                a + "to_out.0.weight": r(d, e),
                a + "group_norm.weight": norm(e // h),
                a + "k_select.fc1.weight": r(d // 32, d, std=0.5),
                a + "k_select.fc2.weight": r(d // 2, d // 32, std=0.5),
                a + "v_select.fc1.weight": r(d // 32, d, std=0.5),
                a + "v_select.fc2.weight": r(int(d // 0.5), d // 32, std=0.5),
                a + "k_norm.weight": norm(qk),
                a + "v_norm.weight": norm(e),
            }
        )
    # The release also stores its rotation buffers; the loader must accept and ignore them.
    sd["model.retnet_rel_pos.angle"] = torch.zeros(qk // h)
    sd["model.retnet_rel_pos.decay"] = torch.zeros(h)
    if not c["tie_word_embeddings"]:
        sd["lm_head.weight"] = r(VOCAB, d)
    return sd


def save_folder(folder: Path, config: dict, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def load(folder: Path) -> torch.nn.Module:
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model


# ---- an independent quadratic (parallel) form, following the release's forward ----------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _theta_shift(x: torch.Tensor) -> torch.Tensor:
    """x [H, T, d]: torchscale's interleaved rotation at positions 0..T-1, written with sin/cos tables."""
    _, t, d = x.shape
    angle = (1.0 / 10000 ** torch.linspace(0, 1, d // 2, dtype=torch.float64)).repeat_interleave(2)  # [d]
    idx = torch.arange(t, dtype=torch.float64)[:, None]
    sin, cos = torch.sin(idx * angle), torch.cos(idx * angle)  # [T, d]
    rot = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * cos + rot * sin


def quadratic_logits(sd: dict[str, torch.Tensor], c: dict, tokens: list[int], release_norm: bool) -> torch.Tensor:
    """All-token logits [T, V] of one sequence from position 0. ``release_norm``: divide score rows by
    clamp(Σ|·|, 1, 5e4) as the release's parallel form does, else by √c_n as its recurrent form does."""
    sd = {k: v.double() for k, v in sd.items()}
    h, qk, eps, m = c["num_attention_heads"], c["query_key_dim"], c["rms_norm_eps"], c["dense_block_layers"]
    t = len(tokens)
    x = sd["model.embed_tokens.weight"][torch.tensor(tokens)]
    gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(h, dtype=torch.float64))
    dist = torch.arange(t)[:, None] - torch.arange(t)[None, :]
    mask = torch.where(dist >= 0, gamma[:, None, None] ** dist.clamp(min=0), 0.0)  # [H, T, T]
    mask = mask / mask.sum(-1, keepdim=True).sqrt()
    k_feats: list[torch.Tensor] = []
    v_feats: list[torch.Tensor] = []
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        y = _rms(x, sd[f"model.layers.{i}.input_layernorm.weight"], eps)
        q = F.silu(y @ sd[p + "q_proj.weight"].T)
        k = F.silu(y @ sd[p + "k_proj.weight"].T) * (qk // h) ** -0.5
        v, gate = F.silu(y @ sd[p + "to_hidden.0.weight"].T).chunk(2, dim=-1)
        k_cur, v_cur = k, v
        if i >= 1 and m > 0:
            gk = F.silu(F.silu(y @ sd[p + "k_select.fc1.weight"].T) @ sd[p + "k_select.fc2.weight"].T)
            gv = F.silu(F.silu(y @ sd[p + "v_select.fc1.weight"].T) @ sd[p + "v_select.fc2.weight"].T)
            k = _rms(k + sum(gk * kp for kp in k_feats), sd[p + "k_norm.weight"], eps)
            v = _rms(v + sum(gv * vp for vp in v_feats), sd[p + "v_norm.weight"], eps)
        qr = _theta_shift(q.view(t, h, -1).transpose(0, 1))  # [H, T, dk]
        kr = _theta_shift(k.view(t, h, -1).transpose(0, 1))
        scores = (qr @ kr.transpose(-1, -2)) * mask
        if release_norm:
            scores = scores / scores.abs().sum(-1, keepdim=True).clamp(min=1, max=5e4)
        o = (scores @ v.view(t, h, -1).transpose(0, 1)).transpose(0, 1)  # [T, H, dv]
        o = _rms(o, sd[p + "group_norm.weight"], eps).reshape(t, -1) * gate
        x = x + o @ sd[p + "to_out.0.weight"].T
        if m > 0:
            k_feats, v_feats = [*k_feats, k_cur][-m:], [*v_feats, v_cur][-m:]
    return (_rms(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T).float()


def _prefill_all_logits(model: torch.nn.Module, seqs: list[list[int]]) -> torch.Tensor:
    states = harness.alloc_states(model, 2 * len(seqs) + 2)
    batch = harness.prefill_batch(seqs, [2 * i + 1 for i in range(len(seqs))], [0] * len(seqs), model.device, True)
    with torch.no_grad():
        return model.prefill(batch, states)


def _seqs(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("m", [0, 1, 2])
def test_prefill_matches_quadratic_form(tmp_path: Path, m: int) -> None:
    c = dense_config(dense_block_layers=m)
    sd = dense_state_dict(c)
    model = load(save_folder(tmp_path / "m", c, sd))
    assert isinstance(model, DenseRetNetLM)
    seqs = _seqs(1, (21, 4, 37))
    ref = torch.cat([quadratic_logits(sd, c, s, release_norm=False) for s in seqs])
    torch.testing.assert_close(_prefill_all_logits(model, seqs), ref, atol=2e-4, rtol=2e-4)


def test_release_parallel_normalisation_agrees_up_to_eps(tmp_path: Path) -> None:
    """The release's parallel form (row sums of |scores|) differs from the recurrent √c_n form by a
    positive factor per row that the RMSNorms remove up to eps: with a negligible eps they agree."""
    c = dense_config(rms_norm_eps=1e-12)
    sd = dense_state_dict(c, seed=5)
    model = load(save_folder(tmp_path / "m", c, sd))
    seqs = _seqs(2, (30,))
    ref = torch.cat([quadratic_logits(sd, c, s, release_norm=True) for s in seqs])
    torch.testing.assert_close(_prefill_all_logits(model, seqs), ref, atol=2e-4, rtol=2e-4)


def test_dense_connection_changes_the_output(tmp_path: Path) -> None:
    c0, c1 = dense_config(dense_block_layers=0), dense_config(dense_block_layers=1)
    sd = dense_state_dict(c1, seed=6)
    seqs = _seqs(3, (12,))
    a = _prefill_all_logits(load(save_folder(tmp_path / "a", c0, sd)), seqs)
    b = _prefill_all_logits(load(save_folder(tmp_path / "b", c1, sd)), seqs)
    assert (a - b).abs().max() > 1e-2


def test_m0_equals_plain_retnet(tmp_path: Path) -> None:
    """With m = 0 the model is RetNet with silu on q, k and v, a GAU gate and no FFN: our RetNetLM with
    those options and the same weights (to_hidden split into v_proj and g_proj) gives the same logits
    in prefill and decode."""
    c = dense_config(dense_block_layers=0)
    sd = dense_state_dict(c, seed=7)
    dense = load(save_folder(tmp_path / "m", c, sd))
    d, e = c["hidden_size"], c["hidden_size"] * c["v_factor"]
    rcfg = RetNetConfig(
        vocab_size=VOCAB,
        hidden_size=d,
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_attention_heads"],
        key_dim=c["query_key_dim"],
        value_dim=e,
        intermediate_size=0,
        norm_eps=c["rms_norm_eps"],
        retention_style="torchscale",
        retention_norm="sqrt_cn",
        feature_map="swish",
        value_act="swish",
    )
    plain = RetNetLM(rcfg, "torch")
    renamed = {"model.embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"]}
    renamed["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.self_attn.", f"model.layers.{i}.attn."
        v_w, g_w = sd[src + "to_hidden.0.weight"].chunk(2, dim=0)
        renamed.update(
            {
                f"model.layers.{i}.attn_norm.weight": sd[f"model.layers.{i}.input_layernorm.weight"],
                dst + "q_proj.weight": sd[src + "q_proj.weight"],
                dst + "k_proj.weight": sd[src + "k_proj.weight"],
                dst + "v_proj.weight": v_w,
                dst + "g_proj.weight": g_w,
                dst + "o_proj.weight": sd[src + "to_out.0.weight"],
                dst + "g_norm_swish_gate.weight": sd[src + "group_norm.weight"],
            }
        )
    assert plain.load_weights(renamed.items()) == {n for n, _ in plain.named_parameters()}
    plain.post_load()
    plain.eval()
    seqs = _seqs(4, (17, 6))
    torch.testing.assert_close(_prefill_all_logits(dense, seqs), _prefill_all_logits(plain, seqs), atol=1e-5, rtol=1e-5)
    s_dense, s_plain = harness.alloc_states(dense, 2), harness.alloc_states(plain, 2)
    torch.testing.assert_close(
        harness.decode_one_by_one(dense, s_dense, seqs[0], 1),
        harness.decode_one_by_one(plain, s_plain, seqs[0], 1),
        atol=1e-5,
        rtol=1e-5,
    )
    # DenseRetNet scales k before it enters the state, RetNet scales q·S: states differ by d_k^{-1/2}.
    scaled = [{"S": layer["S"] * (c["query_key_dim"] // c["num_attention_heads"]) ** -0.5} for layer in s_plain]
    harness.assert_states_close(harness.snapshot(s_dense, 1), harness.snapshot(scaled, 1), 1e-5, 1e-5)


@pytest.mark.parametrize("m", [1, 2])
def test_chunked_prefill_and_batch(tmp_path: Path, m: int) -> None:
    """Parallel (chunked prefill, any chunk size) == recurrent (token-by-token decode), and batch == alone."""
    c = dense_config(dense_block_layers=m, tie_word_embeddings=m == 2)
    model = load(save_folder(tmp_path / "m", c, dense_state_dict(c, seed=8)))
    prompt = _seqs(5, (19,))[0]
    harness.check_chunked_prefill(model, prompt, chunk_sizes=(1, 2, 3, 7, 64))
    harness.check_batch_equals_alone(model, [prompt[:9], prompt, prompt[:1]])


def test_registry_and_released_shapes() -> None:
    # The release's config says model_type "llama" (a saved copy adds LlamaForCausalLM): auto_map decides.
    assert resolve_class(dense_config()) is DenseRetNetLM
    assert resolve_class({**dense_config(), "architectures": ["LlamaForCausalLM"]}) is DenseRetNetLM
    released_350m = dense_config(hidden_size=1536, query_key_dim=768, num_hidden_layers=16, vocab_size=32000)
    cfg = DenseRetNetConfig.from_hf(released_350m)
    assert cfg.retention.state_shape == (2, 384, 1536)
    with torch.device("meta"):
        model = DenseRetNetLM(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["model.layers.0.self_attn.to_hidden.0.weight"] == (6144, 1536)
    assert shapes["model.layers.0.self_attn.k_select.fc2.weight"] == (768, 48)
    assert shapes["model.layers.0.self_attn.v_select.fc2.weight"] == (3072, 48)
    assert shapes["model.layers.0.self_attn.group_norm.weight"] == (1536,)
