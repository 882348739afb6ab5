"""``rnnserve bench throughput`` on a tiny random Mamba: figures are produced and our greedy tokens
equal transformers' generate() (float32). Nothing here asserts on speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rnnserve.bench import throughput

pytest.importorskip("rnnserve.models.mamba")


@pytest.fixture
def mamba_dir(hf_model_dir):
    from transformers import MambaConfig

    folder, _ = hf_model_dir(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=120, state_size=8))
    return folder


def test_bench_writes_json_and_matches_transformers(mamba_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--model", str(mamba_dir), "--batch-sizes", "1,3", "--prompt-len", "9", "--gen-len", "5"]
    assert throughput.main([*argv, "--dtype", "float32", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["architecture"] == "MambaForCausalLM" and report["device_type"] == "cpu"
    assert report["torch"] and report["dtype"] == "float32"
    assert [r["batch_size"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        b = r["batch_size"]
        assert r["engine"]["prefill_tokens"] == 9 * b and r["engine"]["decode_tokens"] == 4 * b
        assert r["engine"]["prefill_tok_s"] > 0 and r["engine"]["decode_tok_s"] > 0
        assert r["hf"]["prefill_tokens"] == 9 * b and r["ratio"]["decode"] > 0
        assert r["greedy_match"] == 1.0  # every sequence: same 5 greedy tokens as generate()
        assert r["greedy_prefix_match"] == 1.0
    text = capsys.readouterr().out
    assert "prefill tok/s" in text and "decode tok/s" in text


def test_the_baseline_stays_greedy_with_a_recommended_sampling(mamba_dir, tmp_path):
    # A generation_config.json that recommends sampling for serving (as the embedded model's does):
    # generate() would apply its repetition_penalty even to greedy tokens.
    config = mamba_dir / "generation_config.json"
    recommended = {"do_sample": True, "temperature": 0.3, "top_k": 5, "repetition_penalty": 2.0}
    config.write_text(json.dumps(json.loads(config.read_text()) | recommended))
    out = tmp_path / "bench.json"
    argv = ["--model", str(mamba_dir), "--batch-sizes", "2", "--prompt-len", "6", "--gen-len", "12", "--json", str(out)]
    assert throughput.main([*argv, "--dtype", "float32", "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["results"][0]["greedy_match"] == 1.0


def test_bench_without_baseline_and_bad_args(mamba_dir, tmp_path):
    out = tmp_path / "b.json"
    argv = ["--model", str(mamba_dir), "--batch-sizes", "2", "--prompt-len", "4", "--gen-len", "3", "--no-baseline"]
    argv += ["--enforce-eager", "--warmup", "0"]
    assert throughput.main([*argv, "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["hf"] is None and row["ratio"] is None and row["engine"]["decode_tokens"] == 4
    assert throughput.main(["--model", str(mamba_dir), "--batch-sizes", "x"]) == 2
    assert throughput.main(["--model", str(mamba_dir), "--gen-len", "1"]) == 2


def test_bench_does_not_import_fastapi():
    code = "import sys, rnnserve.bench.throughput; sys.exit('fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_bench_defaults_to_the_embedded_model(mamba_dir, tmp_path, monkeypatch, capsys):
    import rnnserve.models.default

    monkeypatch.setattr(rnnserve.models.default, "ensure_default_model", lambda: mamba_dir)
    out = tmp_path / "b.json"
    argv = ["--batch-sizes", "1", "--prompt-len", "4", "--gen-len", "2", "--no-baseline", "--warmup", "0"]
    assert throughput.main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"] == str(mamba_dir)
    # A model that cannot load is one line, not a traceback.
    capsys.readouterr()
    assert throughput.main(["--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnserve: error:") and "nowhere" in err and err.count("\n") == 1


def test_the_whole_batch_is_prefilled_in_one_step(mamba_dir):
    # On a CPU the scheduler's default is first come, first prefilled; the benchmark must not use it,
    # or sequences that decode while others prefill would count in the decode rate without their time.
    from rnnserve.config import ModelConfig, RunnerConfig
    from rnnserve.engine.request import SamplingParams
    from rnnserve.models.loader import load_model

    loaded = load_model(ModelConfig(model=str(mamba_dir), dtype="float32", device="cpu"))
    engine = throughput.make_engine(loaded, 5, 5 * 70, RunnerConfig())
    for i in range(5):  # 70 tokens each: more than the CPU default packs into one step
        engine.add_request(str(i), [10 + j % 100 for j in range(70)], SamplingParams(max_tokens=3, temperature=0.0))
    assert {out.request_id for out in engine.step() if out.new_token_ids} == {str(i) for i in range(5)}
