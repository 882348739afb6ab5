"""``rnnserve bench llamacpp`` without llama.cpp: its commands, the parsing of llama.cpp's outputs (JSON
and Markdown, with log lines around them), tool discovery, and a whole run against fake llama.cpp
programs (small Python scripts) with our engine's benchmark replaced by a stub. No network, no model."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from rnnserve.bench import llamacpp, throughput
from rnnserve.bench.llamacpp import BenchError, Command, Tools

BATCHED_JSONL = """\
main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512
llama_context: n_ctx = 8192 [recurrent]
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, \
"n_threads": 2, "n_threads_batch": 2, "pp": 128, "tg": 128, "pl": 1, "n_kv": 256, "t_pp": 0.5, "speed_pp": 256.0, \
"t_tg": 2.5, "speed_tg": 51.2, "t": 3.0, "speed": 85.3}
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, \
"n_threads": 2, "n_threads_batch": 2, "pp": 128, "tg": 128, "pl": 8, "n_kv": 2048, "t_pp": 4.0, "speed_pp": 256.0, \
"t_tg": 8.0, "speed_tg": 128.0, "t": 12.0, "speed": 170.7}

llama_perf_context_print:        load time =     120.00 ms
"""

BATCHED_MD = """\
main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_threads = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |    1 |    256 |    0.500 |   256.00 |    2.500 |    51.20 |    3.000 |    85.33 |
|   128 |    128 |   32 |   8192 |   16.000 |   256.00 |   24.000 |   170.67 |   40.000 |   204.80 |
"""

LLAMA_BENCH_JSON = """\
[INFO] loading model (a log line with brackets)
[
  {
    "build_commit": "unknown",
    "model_type": "mamba 130M F32",
    "n_threads": 2,
    "n_prompt": 2048,
    "n_gen": 0,
    "avg_ts": 261.5,
    "stddev_ts": 1.25,
    "samples_ts": [ 260.25, 262.75 ]
  }
]
"""

LLAMA_BENCH_MD = """\
| model            |       size |   params | backend | threads |   test |           t/s |
| ---------------- | ---------: | -------: | ------- | ------: | -----: | ------------: |
| mamba 130M F32   | 492.99 MiB | 129.14 M | CPU     |       2 | pp2048 | 261.23 ± 1.05 |

build: unknown (0)
"""


def fake_tools(tmp_path: Path) -> Tools:
    return Tools(
        batched_bench=tmp_path / "llama-batched-bench",
        bench=tmp_path / "llama-bench",
        quantize=tmp_path / "llama-quantize",
        converter=tmp_path / "src" / "convert_hf_to_gguf.py",
        python="python3",
    )


def test_commands_match_the_benchmarks_flags(tmp_path):
    tools = fake_tools(tmp_path)
    cmd = llamacpp.batched_bench_command(tools, Path("m.gguf"), (1, 8, 32), 128, 128, 2)
    argv = list(cmd.argv)
    # The context must hold the largest batch's prompts and generations, or batched-bench skips it.
    assert argv[argv.index("-c") + 1] == str(32 * 256)
    assert argv[argv.index("-npl") + 1] == "1,8,32" and argv[argv.index("-npp") + 1] == "128"
    assert argv[argv.index("-t") + 1] == "2" and argv[argv.index("-tb") + 1] == "2"
    assert argv[-2:] == ["--output-format", "jsonl"]

    bench = list(llamacpp.llama_bench_command(tools, Path("m.gguf"), 2048, 2, 1).argv)
    assert bench[bench.index("-p") + 1] == "2048" and bench[bench.index("-n") + 1] == "0"
    assert bench[-2:] == ["-o", "json"]

    quant = llamacpp.quantize_command(tools, Path("a.gguf"), Path("b.gguf"), "q8_0", 2)
    assert quant.argv[1:] == ("a.gguf", "b.gguf", "Q8_0", "2")

    # Without gguf-py beside the converter no PYTHONPATH is set; with it, that folder is used.
    conv = llamacpp.convert_command(tools, Path("ckpt"), Path("out.gguf"))
    assert conv.env == () and conv.argv[-4:] == ("--outtype", "f32", "--outfile", "out.gguf")
    (tmp_path / "src" / "gguf-py").mkdir(parents=True)
    assert llamacpp.convert_command(tools, Path("ckpt"), Path("o")).env == (
        ("PYTHONPATH", str(tmp_path / "src" / "gguf-py")),
    )


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_rnnserve_command_is_a_valid_throughput_command(precision, tmp_path):
    cmd = llamacpp.rnnserve_command("py", Path("ckpt"), (1, 8), 128, 64, precision, "fused", 3, tmp_path / "o.json")
    assert cmd.argv[:5] == ("py", "-m", "rnnserve", "bench", "throughput") and cmd.env == (("OMP_NUM_THREADS", "3"),)
    args = throughput.build_parser().parse_args(list(cmd.argv[5:]))
    assert args.no_baseline and args.batch_sizes == "1,8" and (args.prompt_len, args.gen_len) == (128, 64)
    assert args.quantization == ("int8" if precision == "int8" else "none") and args.dtype == "float32"
    assert args.cpu_decode == "fused"
    assert cmd.text().startswith("OMP_NUM_THREADS=3 py -m rnnserve bench throughput")


def test_the_default_cpu_decode_is_the_servers():
    """The comparison measures what `rnnserve serve` decodes with on such a CPU (auto: the fused step)."""
    assert llamacpp.build_parser().parse_args(["--random-shape", "mamba-130m"]).cpu_decode == "fused"


def test_command_text_quotes_for_a_shell():
    assert Command(("a b", "c"), (("X", "1 2"),)).text() == "X='1 2' 'a b' c"


def test_parse_batched_bench_json_lines_and_markdown():
    rows = llamacpp.parse_batched_bench(BATCHED_JSONL)
    assert sorted(rows) == [1, 8]
    assert rows[1]["speed_tg"] == pytest.approx(51.2) and rows[8]["speed_tg"] == pytest.approx(128.0)
    assert rows[8]["pp"] == 128 and rows[8]["speed_pp"] == pytest.approx(256.0)
    md = llamacpp.parse_batched_bench(BATCHED_MD)
    assert sorted(md) == [1, 32] and md[32]["speed_tg"] == pytest.approx(170.67)
    with pytest.raises(BenchError, match="no results"):
        llamacpp.parse_batched_bench("main: error: failed to load model\n")


def test_parse_llama_bench_json_and_markdown():
    records = llamacpp.parse_llama_bench(LLAMA_BENCH_JSON)
    assert llamacpp.prefill_tok_s(records, 2048) == pytest.approx(261.5)
    with pytest.raises(BenchError, match="pp512"):
        llamacpp.prefill_tok_s(records, 512)
    md = llamacpp.parse_llama_bench(LLAMA_BENCH_MD)
    assert llamacpp.prefill_tok_s(md, 2048) == pytest.approx(261.23)
    with pytest.raises(BenchError, match="no results"):
        llamacpp.parse_llama_bench("error: [model] not found\n")


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport json, sys, os\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def make_fake_llamacpp(root: Path, calls: Path) -> Path:
    """A source tree with build/bin programs that log their argv to ``calls`` and print what the real ones
    print; returns the bin folder. The converter and llama-quantize write their output file."""
    log = f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')"
    _script(
        root / "convert_hf_to_gguf.py",
        f"{log}\nassert os.environ['PYTHONPATH'].endswith('gguf-py')\n"
        "open(sys.argv[sys.argv.index('--outfile') + 1], 'w').write('GGUF f32')",
    )
    (root / "gguf-py").mkdir()
    bin_dir = root / "build" / "bin"
    _script(bin_dir / "llama-quantize", f"{log}\nopen(sys.argv[2], 'w').write('GGUF ' + sys.argv[3])")
    # Decode speed = 10 x batch size; prefill 300 tok/s.
    _script(
        bin_dir / "llama-batched-bench",
        f"{log}\nprint('llama_context: loading')\n"
        "for pl in map(int, sys.argv[sys.argv.index('-npl') + 1].split(',')):\n"
        "    print(json.dumps({'pp': 128, 'tg': 128, 'pl': pl, 'speed_pp': 99.0, 'speed_tg': 10.0 * pl}))",
    )
    _script(
        bin_dir / "llama-bench",
        f"{log}\nprint(json.dumps([{{'n_prompt': int(sys.argv[sys.argv.index('-p') + 1]), 'n_gen': 0, "
        "'avg_ts': 300.0, 'samples_ts': [300.0]}]))",
    )
    return bin_dir


def test_find_tools(tmp_path, monkeypatch):
    bin_dir = make_fake_llamacpp(tmp_path / "llama.cpp", tmp_path / "calls.jsonl")
    tools = llamacpp.find_tools(bin_dir, None, "py")
    assert tools.batched_bench == bin_dir / "llama-batched-bench"
    assert tools.converter == tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"  # two levels above build/bin
    monkeypatch.setenv("PATH", str(bin_dir))
    assert llamacpp.find_tools(None, tools.converter, "py").bench == bin_dir / "llama-bench"
    with pytest.raises(BenchError, match="--converter"):
        llamacpp.find_tools(None, None, "py")
    (bin_dir / "llama-bench").unlink()
    with pytest.raises(BenchError, match="llama-bench not found"):
        llamacpp.find_tools(bin_dir, None, "py")


def test_whole_run_against_fake_llamacpp(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "calls.jsonl"
    bin_dir = make_fake_llamacpp(tmp_path / "llama.cpp", calls)
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    order: list[str] = []

    def fake_rnnserve(cmd: Command, json_path: Path, timeout_s: float) -> dict:
        # Ours: decode = 20 x batch (2x llama.cpp), prefill 150 tok/s (0.5x).
        args = throughput.build_parser().parse_args(list(cmd.argv[5:]))
        assert args.quantization == "int8" and dict(cmd.env)["OMP_NUM_THREADS"] == "2"
        order.append("rnnserve")
        results = [
            {"batch_size": int(b), "engine": {"decode_tok_s": 20.0 * int(b), "prefill_tok_s": 150.0}}
            for b in args.batch_sizes.split(",")
        ]
        return {"results": results}

    monkeypatch.setattr(llamacpp, "run_rnnserve", fake_rnnserve)
    real_run = llamacpp.run_command

    def tracking_run(cmd: Command, timeout_s: float) -> str:
        order.append(Path(cmd.argv[0]).name)
        return real_run(cmd, timeout_s)

    monkeypatch.setattr(llamacpp, "run_command", tracking_run)
    work, out = tmp_path / "work", tmp_path / "r.json"
    argv = ["--model", str(model), "--llamacpp-bin", str(bin_dir), "--work-dir", str(work), "--precision", "int8"]
    argv += ["--batch-sizes", "1,4", "--prefill-len", "64", "--rounds", "2", "--json", str(out), "--label", "M"]
    assert llamacpp.main(argv) == 0

    assert (work / "ckpt-q8_0.gguf").read_text() == "GGUF Q8_0"
    report = json.loads(out.read_text())
    assert report["gguf"].endswith("ckpt-q8_0.gguf") and len(report["rounds"]) == 2
    summary = report["summary"]
    assert summary["decode/4"]["llamacpp"]["median"] == pytest.approx(40.0)
    assert summary["decode/4"]["ratio"]["per_round"] == pytest.approx([2.0, 2.0])
    assert summary["prefill"]["ratio"]["median"] == pytest.approx(0.5)
    # Rounds alternate who goes first: ours then theirs, then theirs then ours (after the two setup steps).
    measured = order[2:]
    assert measured[:4] == ["rnnserve", "llama-batched-bench", "rnnserve", "llama-bench"]
    assert measured[4:] == ["llama-batched-bench", "rnnserve", "llama-bench", "rnnserve"]
    text = capsys.readouterr().out
    assert "| M int8 vs Q8_0, decode, batch 4 | 80.0 | 40.0 | 2.00x |" in text
    assert "| M int8 vs Q8_0, prefill 64 | 150.0 | 300.0 | 0.50x |" in text
    assert "llama-batched-bench -m" in text and "OMP_NUM_THREADS=2" in text and "Q8_0 2" in text

    # A second run reuses both GGUF files: neither the converter nor llama-quantize runs again.
    n_calls = len(calls.read_text().splitlines())
    assert llamacpp.main([*argv[:-4], "--rounds", "1"]) == 0
    new_calls = calls.read_text().splitlines()[n_calls:]
    assert [c for c in new_calls if "--outfile" in c or "Q8_0" in c] == []

    # An f32 GGUF newer than the Q8_0 one (reconverted) makes the Q8_0 stale: quantized again, not converted.
    f32, q8 = work / "ckpt-f32.gguf", work / "ckpt-q8_0.gguf"
    os.utime(q8, (q8.stat().st_atime, f32.stat().st_mtime - 10))
    n_calls = len(calls.read_text().splitlines())
    assert llamacpp.main([*argv[:-4], "--rounds", "1"]) == 0
    new_calls = calls.read_text().splitlines()[n_calls:]
    assert [c for c in new_calls if "--outfile" in c] == [] and len([c for c in new_calls if "Q8_0" in c]) == 1


def test_failing_tool_is_one_error_line(tmp_path, monkeypatch, capsys):
    bin_dir = make_fake_llamacpp(tmp_path / "llama.cpp", tmp_path / "calls.jsonl")
    _script(bin_dir / "llama-batched-bench", "print('error: unknown model architecture: mamba9'); sys.exit(1)")
    monkeypatch.setattr(llamacpp, "run_rnnserve", lambda cmd, path, t: {"results": []})
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    argv = ["--model", str(model), "--llamacpp-bin", str(bin_dir), "--work-dir", str(tmp_path / "w")]
    assert llamacpp.main([*argv, "--rounds", "1"]) == 1
    err = capsys.readouterr().err
    assert "exit status 1" in err and "unknown model architecture" in err
    assert llamacpp.main(["--model", str(tmp_path), "--llamacpp-bin", str(bin_dir)]) == 2  # no config.json
    assert llamacpp.main([*argv, "--gen-len", "1"]) == 2


@pytest.mark.parametrize(
    "warning",
    [
        "fused CPU decode unavailable, decoding with the torch path: the CPU lacks AVX2/FMA",
        "--cpu-decode fused: the fused CPU decode runs float32 weights; decoding with the torch path",
    ],
)
def test_fused_decode_fallback_is_an_error(warning, tmp_path):
    """A run whose fused decode fell back to the torch path (rnnserve's warning) is not reported."""
    prog = _script(tmp_path / "ours", f"import sys; print({warning!r}, file=sys.stderr)")
    (tmp_path / "o.json").write_text('{"results": []}')
    with pytest.raises(BenchError, match="decoding with the torch path"):
        llamacpp.run_rnnserve(Command((str(prog),)), tmp_path / "o.json", 60)
    quiet = _script(tmp_path / "quiet", "print('done')")
    assert llamacpp.run_rnnserve(Command((str(quiet),)), tmp_path / "o.json", 60) == {"results": []}
