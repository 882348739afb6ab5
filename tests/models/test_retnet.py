"""RetNet: fla-hub layout loaded from a saved folder, against an independent quadratic (parallel) form
written here, against torchscale's MultiScaleRetention (parallel, recurrent and chunkwise forms), and
the shared chunked-prefill / batch consistency checks."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rnnserve.config import ModelConfig
from rnnserve.models.loader import load_model
from rnnserve.models.registry import resolve_class
from rnnserve.models.retnet import MultiScaleRetention, RetNetConfig, RetNetLM
from tests.models import harness

VOCAB = 97


def fla_config(**overrides: object) -> dict:
    """A small fla ``RetNetConfig`` as config.json holds it."""
    c = {
        "architectures": ["RetNetForCausalLM"],
        "model_type": "retnet",
        "hidden_size": 32,
        "num_heads": 4,
        "num_kv_heads": None,
        "expand_k": 1,
        "expand_v": 2,
        "hidden_ratio": 2,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "norm_eps": 1e-6,
        "hidden_act": "swish",
        "use_output_gate": True,
        "fuse_norm": True,
        "tie_word_embeddings": False,
        "vocab_size": VOCAB,
    }
    c.update(overrides)
    return c


def fla_state_dict(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under fla's checkpoint names (written out here, not taken from our module)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + r(n, std=0.1)

    d, h = c["hidden_size"], c["num_heads"]
    hkv = c.get("num_kv_heads") or h
    kd, vd, inter = int(d * c["expand_k"]), int(d * c["expand_v"]), c["intermediate_size"]
    sd = {"model.embeddings.weight": r(VOCAB, d, std=1.0), "model.norm.weight": norm(d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "attn_norm.weight": norm(d),
                p + "attn.q_proj.weight": r(kd, d),
                p + "attn.k_proj.weight": r(kd * hkv // h, d),
                p + "attn.v_proj.weight": r(vd * hkv // h, d),
                p + "attn.g_proj.weight": r(vd, d),
                p + "attn.o_proj.weight": r(d, vd),
                p + "attn.g_norm_swish_gate.weight": norm(vd // h),
                p + "mlp_norm.weight": norm(d),
                p + "mlp.gate_proj.weight": r(inter, d),
                p + "mlp.up_proj.weight": r(inter, d),
                p + "mlp.down_proj.weight": r(d, inter),
            }
        )
    if not c["tie_word_embeddings"]:
        sd["lm_head.weight"] = r(VOCAB, d)
    return sd


def save_folder(folder: Path, config: dict, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def load(folder: Path) -> RetNetLM:
    model = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model
    assert isinstance(model, RetNetLM)
    return model


# ---- an independent quadratic (parallel) form of the whole model -------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _rotate_complex(x: torch.Tensor, style: str) -> torch.Tensor:
    """x [T, H, d] rotated by position t with complex multiplication (fla: halves, torchscale: pairs)."""
    t, _, d = x.shape
    if style == "fla":
        freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    else:
        freqs = 10000.0 ** (-torch.linspace(0, 1, d // 2, dtype=torch.float64))
        z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    z = z * torch.polar(torch.ones(t, 1, d // 2, dtype=torch.float64), torch.arange(t)[:, None, None] * freqs)
    if style == "fla":
        return torch.cat((z.real, z.imag), dim=-1)
    return torch.stack((z.real, z.imag), dim=-1).flatten(-2)


def quadratic_logits(sd: dict[str, torch.Tensor], c: dict, tokens: list[int]) -> torch.Tensor:
    """All-token logits [T, V] of one sequence from position 0, retention as an explicit T×T matrix."""
    sd = {k: v.double() for k, v in sd.items()}
    h, eps = c["num_heads"], c["norm_eps"]
    rep = h // (c.get("num_kv_heads") or h)
    style = c.get("retention_style", "fla")
    norm = c.get("retention_norm", "abs_sum" if style == "torchscale" else "none")
    t = len(tokens)
    x = sd["model.embeddings.weight"][torch.tensor(tokens)]
    gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(h, dtype=torch.float64))  # [H]
    dist = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # i - j
    decay = torch.where(dist >= 0, gamma[:, None, None] ** dist.clamp(min=0), 0.0)  # [H, T, T]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = _rms(x, sd[p + "attn_norm.weight"], eps)
        q = (y @ sd[p + "attn.q_proj.weight"].T).view(t, h, -1)
        k = (y @ sd[p + "attn.k_proj.weight"].T).view(t, h // rep, -1).repeat_interleave(rep, 1)
        v = (y @ sd[p + "attn.v_proj.weight"].T).view(t, h // rep, -1).repeat_interleave(rep, 1)
        dk = q.shape[-1]
        q, k = _rotate_complex(q, style), _rotate_complex(k, style)
        scores = torch.einsum("ihd,jhd->hij", q, k) * dk**-0.5 * decay  # [H, T, T]
        if norm in ("sqrt_cn", "abs_sum"):
            scores = scores / decay.sum(-1, keepdim=True).sqrt()
        if norm == "abs_sum":
            scores = scores / scores.sum(-1, keepdim=True).abs().clamp(min=1.0)
        o = torch.einsum("hij,jhd->ihd", scores, v)
        o = _rms(o, sd[p + "attn.g_norm_swish_gate.weight"], eps).reshape(t, -1)
        o = o * F.silu(y @ sd[p + "attn.g_proj.weight"].T)
        x = x + o @ sd[p + "attn.o_proj.weight"].T
        y = _rms(x, sd[p + "mlp_norm.weight"], eps)
        x = (
            x
            + (F.silu(y @ sd[p + "mlp.gate_proj.weight"].T) * (y @ sd[p + "mlp.up_proj.weight"].T))
            @ sd[p + "mlp.down_proj.weight"].T
        )
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embeddings.weight"]
    return (_rms(x, sd["model.norm.weight"], eps) @ head.T).float()


STYLES = [
    pytest.param({}, id="fla"),
    pytest.param({"num_kv_heads": 2, "tie_word_embeddings": True}, id="fla-gqa-tied"),
    pytest.param({"retention_style": "torchscale"}, id="torchscale-abs_sum"),
    pytest.param({"retention_style": "torchscale", "retention_norm": "sqrt_cn"}, id="torchscale-sqrt_cn"),
]


@pytest.mark.parametrize("overrides", STYLES)
def test_prefill_matches_quadratic_form(tmp_path: Path, overrides: dict) -> None:
    c = fla_config(**overrides)
    sd = fla_state_dict(c)
    model = load(save_folder(tmp_path / "m", c, sd))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (23, 5, 40)]
    states = harness.alloc_states(model, 8)
    batch = harness.prefill_batch(seqs, [5, 2, 7], [0, 0, 0], model.device, all_logits=True)
    with torch.no_grad():
        logits = model.prefill(batch, states)
    ref = torch.cat([quadratic_logits(sd, c, s) for s in seqs])
    torch.testing.assert_close(logits, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("overrides", STYLES[:3])
def test_chunked_prefill_and_batch(tmp_path: Path, overrides: dict) -> None:
    c = fla_config(**overrides)
    model = load(save_folder(tmp_path / "m", c, fla_state_dict(c, seed=3)))
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, VOCAB, (19,), generator=g).tolist()
    harness.check_chunked_prefill(model, prompt, chunk_sizes=(1, 2, 3, 7, 64))
    harness.check_batch_equals_alone(model, [prompt[:9], prompt, prompt[:1]])


def test_state_shapes_and_registry() -> None:
    assert resolve_class(fla_config()) is RetNetLM
    assert resolve_class({"model_type": "retnet"}) is RetNetLM
    fla = RetNetLM.from_hf_config(fla_config(), backend="torch")
    assert [s.shape for s in fla.state_specs()[0]] == [(4, 8, 16)]
    assert fla.state_specs()[0][0].dtype == torch.float32
    ts = RetNetLM.from_hf_config(fla_config(retention_style="torchscale"), backend="torch")
    assert [s.shape for s in ts.state_specs()[0]] == [(4, 8, 17)]  # one extra column: the decayed key sum


def test_fla_intermediate_size_rule() -> None:
    # fla's GatedMLP: int(D · hidden_ratio · 2/3) rounded up to a multiple of 256.
    assert RetNetConfig.from_hf(fla_config(intermediate_size=None, hidden_size=400)).intermediate_size == 768
    assert RetNetConfig.from_hf(fla_config(intermediate_size=None, hidden_ratio=None)).intermediate_size == 256


def test_legacy_fused_gate_and_unfused_norm_names(tmp_path: Path) -> None:
    """Older fla checkpoints fuse gate and up in one gate_proj [2I, D]; fuse_norm=False names g_norm."""
    c = fla_config()
    sd = fla_state_dict(c, seed=4)
    legacy = dict(sd)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        legacy[p + "mlp.gate_proj.weight"] = torch.cat(
            [sd[p + "mlp.gate_proj.weight"], legacy.pop(p + "mlp.up_proj.weight")]
        )
        legacy[p + "attn.g_norm.weight"] = legacy.pop(p + "attn.g_norm_swish_gate.weight")
    a, b = load(save_folder(tmp_path / "a", c, sd)), load(save_folder(tmp_path / "b", c, legacy))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)


def test_unsupported_configs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="use_short_conv"):
        RetNetConfig.from_hf(fla_config(use_short_conv=True))
    with pytest.raises(ValueError, match="retention_style"):
        RetNetConfig.from_hf(fla_config(retention_style="xpos"))


# ---- torchscale's MultiScaleRetention, one layer ------------------------------------------------------


@pytest.fixture(scope="module")
def torchscale_retention() -> types.SimpleNamespace:
    """torchscale's retention module and relative-position helper. torchscale imports timm's drop_path
    (only used for training); without timm a stand-in module is installed for the import."""
    pytest.importorskip("torchscale")
    pytest.importorskip("fairscale")
    if importlib.util.find_spec("timm") is None:
        with pytest.MonkeyPatch.context() as mp:
            layers = types.ModuleType("timm.models.layers")
            layers.drop_path = lambda x, drop_prob=0.0, training=False: x  # type: ignore[attr-defined]
            mp.setitem(sys.modules, "timm", types.ModuleType("timm"))
            mp.setitem(sys.modules, "timm.models", types.ModuleType("timm.models"))
            mp.setitem(sys.modules, "timm.models.layers", layers)
            from torchscale.architecture.config import RetNetConfig as TSConfig
            from torchscale.architecture.retnet import RetNetRelPos
            from torchscale.component.multiscale_retention import MultiScaleRetention as TSRetention
    else:
        from torchscale.architecture.config import RetNetConfig as TSConfig
        from torchscale.architecture.retnet import RetNetRelPos
        from torchscale.component.multiscale_retention import MultiScaleRetention as TSRetention
    return types.SimpleNamespace(Config=TSConfig, RelPos=RetNetRelPos, Retention=TSRetention)


D, DV, HEADS, T_LEN = 32, 64, 2, 12


def _pair(
    ts: types.SimpleNamespace, norm: str, eps: float
) -> tuple[torch.nn.Module, torch.nn.Module, MultiScaleRetention]:
    """A torchscale retention layer, its rel-pos module and our layer with the same weights."""
    torch.manual_seed(0)
    args = ts.Config(
        decoder_embed_dim=D,
        decoder_value_embed_dim=DV,
        decoder_retention_heads=HEADS,
        layernorm_eps=eps,
        recurrent_chunk_size=4,
    )
    ref = ts.Retention(args, D, DV, HEADS).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    cfg = RetNetConfig(
        vocab_size=1,
        hidden_size=D,
        num_layers=1,
        num_heads=HEADS,
        num_kv_heads=HEADS,
        key_dim=D,
        value_dim=DV,
        intermediate_size=0,
        norm_eps=eps,
        retention_style="torchscale",
        retention_norm=norm,  # type: ignore[arg-type]
        g_norm_affine=False,  # torchscale's group norm has no weight
    )
    ours = MultiScaleRetention(cfg, "torch").eval()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
            getattr(ours, name).weight.copy_(getattr(ref, name).weight)
        ours.o_proj.weight.copy_(ref.out_proj.weight)
    return ref, ts.RelPos(args), ours


def _ours_prefill(layer: MultiScaleRetention, x: torch.Tensor, splits: tuple[int, ...]) -> torch.Tensor:
    """Our layer over x [T, D] from a zero state in slot 3, in consecutive chunks of the given sizes."""
    state = torch.zeros(4, *layer.cfg.retention.state_shape)
    outs, start = [], 0
    for n in splits:
        pos = torch.arange(start, start + n)
        cu = torch.tensor([0, n], dtype=torch.int32)
        outs.append(layer(x[start : start + n], pos, state, torch.tensor([3]), cu))
        start += n
    return torch.cat(outs)


@torch.no_grad()
def test_torchscale_parallel_form(torchscale_retention: types.SimpleNamespace) -> None:
    ref, rel_pos, ours = _pair(torchscale_retention, "abs_sum", 1e-6)
    x = torch.randn(1, T_LEN, D)
    expected = ref(x, rel_pos(T_LEN))[0]
    torch.testing.assert_close(_ours_prefill(ours, x[0], (T_LEN,)), expected, atol=1e-5, rtol=1e-5)
    # Resumed from the state a first chunk left: the decayed key sum carries the normaliser across.
    torch.testing.assert_close(_ours_prefill(ours, x[0], (5, 1, 6)), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_torchscale_recurrent_form(torchscale_retention: types.SimpleNamespace) -> None:
    ref, rel_pos, ours = _pair(torchscale_retention, "sqrt_cn", 1e-6)
    x = torch.randn(1, T_LEN, D)
    incremental: dict = {}
    expected = torch.cat(
        [
            ref(x[:, t : t + 1], rel_pos(t + 1, activate_recurrent=True), incremental_state=incremental)[0]
            for t in range(T_LEN)
        ]
    )
    torch.testing.assert_close(_ours_prefill(ours, x[0], (T_LEN,)), expected, atol=1e-5, rtol=1e-5)
    state = torch.zeros(4, *ours.cfg.retention.state_shape)
    steps = [ours(x[0, t : t + 1], torch.tensor([t]), state, torch.tensor([2]), None) for t in range(T_LEN)]
    torch.testing.assert_close(torch.cat(steps), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_torchscale_chunkwise_form(torchscale_retention: types.SimpleNamespace) -> None:
    """torchscale's chunkwise form rescales each row by its own running maxima: equal to the parallel
    form only after the per-head RMSNorm and only up to its eps, so compare with a negligible eps."""
    ref, rel_pos, ours = _pair(torchscale_retention, "abs_sum", 1e-12)
    x = torch.randn(1, T_LEN, D)
    expected = ref(x, rel_pos(T_LEN, chunkwise_recurrent=True), chunkwise_recurrent=True)[0]
    torch.testing.assert_close(_ours_prefill(ours, x[0], (T_LEN,)), expected, atol=1e-5, rtol=1e-5)
    _, _, ours_sqrt = _pair(torchscale_retention, "sqrt_cn", 1e-12)
    torch.testing.assert_close(_ours_prefill(ours_sqrt, x[0], (7, 5)), expected, atol=1e-5, rtol=1e-5)
