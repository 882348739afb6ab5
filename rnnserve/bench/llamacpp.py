"""``rnnserve bench llamacpp``: rnnserve's engine against llama.cpp on the same weights, side by side.

llama.cpp is not a dependency: point ``--llamacpp-bin`` at a folder holding ``llama-batched-bench``,
``llama-bench`` and ``llama-quantize`` (or put them on PATH) and ``--converter`` at llama.cpp's
``convert_hf_to_gguf.py`` (found beside the bin folder's source tree or on PATH otherwise; the
``gguf-py`` folder next to it goes on its PYTHONPATH). docs/benchmarks.md says how to build it.

The checkpoint folder (HF format) is converted once to GGUF f32 with llama.cpp's converter, and for
``--precision int8`` quantized to Q8_0 with ``llama-quantize`` (kept in ``--work-dir`` and reused).
Then, for ``--rounds`` rounds, the two engines run one after the other (who goes first alternates),
both at ``--threads`` threads:

- decode at each of ``--batch-sizes``: ours is ``rnnserve bench throughput --no-baseline`` (a
  subprocess with ``OMP_NUM_THREADS``: prefill of the batch in one step, then greedy decode, decode
  tok/s = B x (gen - 1) / decode time); theirs is ``llama-batched-bench`` with the same prompt and
  generation lengths (``S_TG``: B x gen / generation time).
- prefill of one ``--prefill-len``-token prompt (0 skips it): ours is the same throughput command at
  batch 1 (prompt tokens / time to the first token); theirs is ``llama-bench -p N -n 0``.

Prints the table (median and range of each engine's tok/s over the rounds, and the range of the
per-round ratio ours / theirs) and every command as run; ``--json`` writes all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rnnserve.console import ArgumentParser, print_error

# llama.cpp's file type for each of our precisions: float32 weights, and int8 weights that llama.cpp
# stores as Q8_0 (blocks of 32 int8 with one scale each; ours keep one scale per output channel).
GGUF_TYPES = {"fp32": "f32", "int8": "q8_0"}
TOOL_NAMES = ("llama-batched-bench", "llama-bench", "llama-quantize")
CONVERTER_NAME = "convert_hf_to_gguf.py"
# What rnnserve logs when --cpu-decode fused falls back to the torch path (no AVX2, a failed build of the
# kernels, int8 weights, ...).
FUSED_FALLBACK = "decoding with the torch path"


class BenchError(Exception):
    """A tool is missing, failed or printed something we cannot read: one line for the user."""


@dataclass(frozen=True)
class Tools:
    """Where llama.cpp's programs are, and the Python that runs its converter."""

    batched_bench: Path
    bench: Path
    quantize: Path
    converter: Path
    python: str


def find_tools(bin_dir: Path | None, converter: Path | None, python: str) -> Tools:
    """Resolve llama.cpp's tools from ``bin_dir`` (else PATH) and its converter from ``converter``
    (else the source tree above ``bin_dir``: build/bin/../../, else PATH)."""
    found: dict[str, Path] = {}
    for name in TOOL_NAMES:
        where = shutil.which(name, path=str(bin_dir)) if bin_dir is not None else shutil.which(name)
        if where is None:
            place = f"in {bin_dir}" if bin_dir is not None else "on PATH (or pass --llamacpp-bin)"
            raise BenchError(f"{name} not found {place}; docs/benchmarks.md says how to build llama.cpp")
        found[name] = Path(where)
    if converter is None:
        candidates = [d / CONVERTER_NAME for d in (bin_dir.parent, bin_dir.parent.parent)] if bin_dir else []
        on_path = shutil.which(CONVERTER_NAME)
        candidates += [Path(on_path)] if on_path else []
        converter = next((c for c in candidates if c.is_file()), None)
        if converter is None:
            raise BenchError(f"{CONVERTER_NAME} not found; pass --converter PATH (it is in llama.cpp's source tree)")
    elif not converter.is_file():
        raise BenchError(f"--converter {converter} is not a file")
    return Tools(found["llama-batched-bench"], found["llama-bench"], found["llama-quantize"], converter, python)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """One program run: its argv and the environment variables it gets on top of ours."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        """The command as one would type it in a shell."""
        prefix = [f"{k}={shlex.quote(v)}" for k, v in self.env]
        return " ".join([*prefix, *(shlex.quote(a) for a in self.argv)])


def convert_command(tools: Tools, model_dir: Path, outfile: Path) -> Command:
    """llama.cpp's converter to an f32 GGUF; its own ``gguf`` package (gguf-py beside it) is used
    when the checkout has one, since the converter needs a gguf at least as new as itself."""
    argv = (tools.python, str(tools.converter), str(model_dir), "--outtype", "f32", "--outfile", str(outfile))
    gguf_py = tools.converter.parent / "gguf-py"
    return Command(argv, (("PYTHONPATH", str(gguf_py)),) if gguf_py.is_dir() else ())


def quantize_command(tools: Tools, src: Path, dst: Path, gguf_type: str, threads: int) -> Command:
    return Command((str(tools.quantize), str(src), str(dst), gguf_type.upper(), str(threads)))


def batched_bench_command(
    tools: Tools, gguf: Path, batch_sizes: Sequence[int], prompt_len: int, gen_len: int, threads: int
) -> Command:
    """``llama-batched-bench``: B sequences of ``prompt_len`` random tokens prefilled, then ``gen_len``
    steps of B tokens. It skips (silently) a batch whose B x (prompt + gen) exceeds the context, so
    the context is sized for the largest batch."""
    ctx = max(batch_sizes) * (prompt_len + gen_len)
    argv = [str(tools.batched_bench), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512"]
    argv += ["-npp", str(prompt_len), "-ntg", str(gen_len), "-npl", ",".join(str(b) for b in batch_sizes)]
    argv += ["-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
    return Command(tuple(argv))


def llama_bench_command(tools: Tools, gguf: Path, prefill_len: int, threads: int, repetitions: int) -> Command:
    """``llama-bench``: prompt processing of ``prefill_len`` tokens (no generation), JSON output."""
    argv = [str(tools.bench), "-m", str(gguf), "-p", str(prefill_len), "-n", "0", "-t", str(threads)]
    argv += ["-r", str(repetitions), "-o", "json"]
    return Command(tuple(argv))


def rnnserve_command(
    python: str,
    model_dir: Path,
    batch_sizes: Sequence[int],
    prompt_len: int,
    gen_len: int,
    precision: str,
    cpu_decode: str,
    threads: int,
    json_path: Path,
) -> Command:
    """``rnnserve bench throughput --no-baseline`` at ``threads`` torch threads (OMP_NUM_THREADS)."""
    argv = [python, "-m", "rnnserve", "bench", "throughput", "--model", str(model_dir), "--no-baseline"]
    argv += ["--dtype", "float32", "--device", "cpu", "--batch-sizes", ",".join(str(b) for b in batch_sizes)]
    argv += ["--prompt-len", str(prompt_len), "--gen-len", str(gen_len)]
    argv += ["--quantization", "int8" if precision == "int8" else "none", "--cpu-decode", cpu_decode]
    argv += ["--json", str(json_path)]
    return Command(tuple(argv), (("OMP_NUM_THREADS", str(threads)),))


# --------------------------------------------------------------------------- parsing


def parse_batched_bench(text: str) -> dict[int, dict[str, float]]:
    """``llama-batched-bench`` output (JSON lines, else its Markdown table) -> per batch size
    {pp, tg, speed_pp, speed_tg}. Log lines around the figures are ignored."""
    rows: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            try:
                obj = json.loads(line)
                rows[int(obj["pl"])] = {k: float(obj[k]) for k in ("pp", "tg", "speed_pp", "speed_tg")}
            except (ValueError, KeyError, TypeError):
                continue
    if rows:
        return rows
    # Markdown: |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10:
            continue
        try:
            pp, tg, pl = int(cells[0]), int(cells[1]), int(cells[2])
            rows[pl] = {"pp": pp, "tg": tg, "speed_pp": float(cells[5]), "speed_tg": float(cells[7])}
        except ValueError:
            continue
    if not rows:
        raise BenchError("no results in llama-batched-bench's output")
    return rows


def parse_llama_bench(text: str) -> list[dict]:
    """``llama-bench -o json`` output -> its test records ({n_prompt, n_gen, avg_ts, samples_ts, ...});
    anything printed before the JSON array is skipped. Falls back to the Markdown table
    (``| ... | pp2048 | 261.23 ± 1.05 |``)."""
    start = text.find("[")
    while start != -1:
        try:
            records, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            start = text.find("[", start + 1)
            continue
        if isinstance(records, list) and records and all(isinstance(r, dict) and "avg_ts" in r for r in records):
            return records
        start = text.find("[", start + 1)
    records = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or "±" not in cells[-1]:
            continue
        test, speed = cells[-2], cells[-1].split("±")[0].strip()
        try:
            ts = float(speed)
        except ValueError:
            continue
        n_prompt = int(test[2:]) if test.startswith("pp") and test[2:].isdigit() else 0
        n_gen = int(test[2:]) if test.startswith("tg") and test[2:].isdigit() else 0
        records.append({"n_prompt": n_prompt, "n_gen": n_gen, "avg_ts": ts, "samples_ts": [ts]})
    if not records:
        raise BenchError("no results in llama-bench's output")
    return records


def prefill_tok_s(records: list[dict], prefill_len: int) -> float:
    """The prompt-processing rate of the ``-p prefill_len -n 0`` test in llama-bench's records."""
    for r in records:
        if int(r.get("n_prompt", 0)) == prefill_len and int(r.get("n_gen", 0)) == 0:
            return float(r["avg_ts"])
    raise BenchError(f"llama-bench reported no pp{prefill_len} test")


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    work_dir: Path
    tools: Tools
    precision: str
    batch_sizes: tuple[int, ...]
    prompt_len: int
    gen_len: int
    prefill_len: int
    cpu_decode: str
    threads: int
    rounds: int
    timeout_s: float
    rnnserve_python: str


def run_command(cmd: Command, timeout_s: float) -> str:
    """Run ``cmd``; return stdout + stderr. A failure or timeout is a BenchError with the output's tail."""
    env = {**os.environ, **dict(cmd.env)}
    try:
        proc = subprocess.run(
            list(cmd.argv), env=env, capture_output=True, text=True, timeout=timeout_s, check=False, errors="replace"
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timed out after {timeout_s:.0f} s: {cmd.text()}") from exc
    except OSError as exc:
        raise BenchError(f"cannot run {cmd.argv[0]}: {exc}") from exc
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise BenchError(f"exit status {proc.returncode}: {cmd.text()}\n{tail}")
    return out


def prepare_gguf(s: Settings, log: Callable[[str], None], commands: list[str]) -> Path:
    """The GGUF of ``s.precision`` in the work folder: converted (and quantized) unless already there."""
    s.work_dir.mkdir(parents=True, exist_ok=True)
    name = s.model_dir.resolve().name
    f32 = s.work_dir / f"{name}-f32.gguf"
    steps = [(f32, convert_command(s.tools, s.model_dir, f32))]
    if s.precision != "fp32":
        target = s.work_dir / f"{name}-{GGUF_TYPES[s.precision]}.gguf"
        steps.append((target, quantize_command(s.tools, f32, target, GGUF_TYPES[s.precision], s.threads)))
    # Each file is reused only while it is newer than what it was made from (the checkpoint's files,
    # then the f32 GGUF): a checkpoint written again, or a reconverted f32, makes the next step rerun.
    source_mtime = max(f.stat().st_mtime for f in s.model_dir.iterdir() if f.is_file())
    for path, cmd in steps:
        commands.append(cmd.text())
        if path.is_file() and path.stat().st_size > 0 and path.stat().st_mtime >= source_mtime:
            log(f"reusing {path}")
            source_mtime = path.stat().st_mtime
            continue
        log(f"$ {cmd.text()}")
        # Write under a temporary name, so an interrupted run never leaves a truncated file to reuse.
        partial = path.with_name(path.name + ".partial")
        run_command(Command(tuple(str(partial) if a == str(path) else a for a in cmd.argv), cmd.env), s.timeout_s)
        if not partial.is_file():
            raise BenchError(f"no {partial} after: {cmd.text()}")
        partial.replace(path)
        source_mtime = path.stat().st_mtime
    return steps[-1][0]


def run_rnnserve(cmd: Command, json_path: Path, timeout_s: float) -> dict:
    """Our throughput benchmark's JSON report (the command writes it to ``json_path``). A fused CPU
    decode that could not be built falls back to the torch path with a warning: that run would not
    measure what was asked, so it is an error."""
    out = run_command(cmd, timeout_s)
    if FUSED_FALLBACK in out:
        line = next(x for x in out.splitlines() if FUSED_FALLBACK in x)
        raise BenchError(f"{line.strip()}: {cmd.text()}")
    try:
        return json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"rnnserve bench throughput wrote no readable {json_path}: {exc}") from exc


def measure_round(s: Settings, gguf: Path, round_index: int, tmp: Path, log: Callable[[str], None]) -> dict:
    """One round: decode at every batch size, then prefill, each engine in turn (llama.cpp first in odd
    rounds). Returns {row key: {"rnnserve": tok/s, "llamacpp": tok/s}} and the commands run."""
    figures: dict[str, dict[str, float]] = {}
    commands: list[str] = []
    ours_first = round_index % 2 == 0

    def both(ours: Callable[[], None], theirs: Callable[[], None]) -> None:
        for f in (ours, theirs) if ours_first else (theirs, ours):
            f()

    decode_json = tmp / f"decode-{round_index}.json"
    ours_decode = rnnserve_command(
        s.rnnserve_python,
        s.model_dir,
        s.batch_sizes,
        s.prompt_len,
        s.gen_len,
        s.precision,
        s.cpu_decode,
        s.threads,
        decode_json,
    )
    theirs_decode = batched_bench_command(s.tools, gguf, s.batch_sizes, s.prompt_len, s.gen_len, s.threads)

    def ours_d() -> None:
        log(f"$ {ours_decode.text()}")
        report = run_rnnserve(ours_decode, decode_json, s.timeout_s)
        for r in report["results"]:
            figures.setdefault(f"decode/{r['batch_size']}", {})["rnnserve"] = r["engine"]["decode_tok_s"]

    def theirs_d() -> None:
        log(f"$ {theirs_decode.text()}")
        rows = parse_batched_bench(run_command(theirs_decode, s.timeout_s))
        for b in s.batch_sizes:
            if b not in rows:
                raise BenchError(f"llama-batched-bench reported no batch {b} (context too small?)")
            figures.setdefault(f"decode/{b}", {})["llamacpp"] = rows[b]["speed_tg"]

    both(ours_d, theirs_d)
    commands += [ours_decode.text(), theirs_decode.text()]
    if s.prefill_len > 0:
        prefill_json = tmp / f"prefill-{round_index}.json"
        ours_prefill = rnnserve_command(
            s.rnnserve_python, s.model_dir, (1,), s.prefill_len, 2, s.precision, s.cpu_decode, s.threads, prefill_json
        )
        theirs_prefill = llama_bench_command(s.tools, gguf, s.prefill_len, s.threads, 1)

        def ours_p() -> None:
            log(f"$ {ours_prefill.text()}")
            report = run_rnnserve(ours_prefill, prefill_json, s.timeout_s)
            figures.setdefault("prefill", {})["rnnserve"] = report["results"][0]["engine"]["prefill_tok_s"]

        def theirs_p() -> None:
            log(f"$ {theirs_prefill.text()}")
            out = run_command(theirs_prefill, s.timeout_s)
            figures.setdefault("prefill", {})["llamacpp"] = prefill_tok_s(parse_llama_bench(out), s.prefill_len)

        both(ours_p, theirs_p)
        commands += [ours_prefill.text(), theirs_prefill.text()]
    return {"figures": figures, "commands": commands}


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict]:
    """Per row: each engine's tok/s per round, median, min, max, and the per-round ratio ours / theirs."""
    out: dict[str, dict] = {}
    for key in rounds[0]:
        ours = [r[key]["rnnserve"] for r in rounds]
        theirs = [r[key]["llamacpp"] for r in rounds]
        ratios = [o / t if t > 0 else float("nan") for o, t in zip(ours, theirs)]
        out[key] = {
            name: {"per_round": v, "median": statistics.median(v), "min": min(v), "max": max(v)}
            for name, v in (("rnnserve", ours), ("llamacpp", theirs), ("ratio", ratios))
        }
    return out


def _span(stats: dict, digits: int) -> str:
    lo, hi = f"{stats['min']:,.{digits}f}", f"{stats['max']:,.{digits}f}"
    return lo if lo == hi else f"{lo}–{hi}"


def row_label(key: str, model_label: str, precision: str, prefill_len: int) -> str:
    kind = "" if precision == "fp32" else f"{precision} vs {GGUF_TYPES[precision].upper()}, "
    if key == "prefill":
        return f"{model_label} {kind}prefill {prefill_len}"
    return f"{model_label} {kind}decode, batch {key.split('/')[1]}"


def format_table(report: dict) -> str:
    """The Markdown table of issue 10: tok/s of both engines over the rounds and the ratio."""
    lines = ["| tok/s | rnnserve | llama.cpp | ratio |", "|---|---:|---:|---:|"]
    for key, row in report["summary"].items():
        label = row_label(key, report["label"], report["precision"], report["prefill_len"])
        ours, theirs = _span(row["rnnserve"], 1), _span(row["llamacpp"], 1)
        lines.append(f"| {label} | {ours} | {theirs} | {_span(row['ratio'], 2)}x |")
    return "\n".join(lines)


def create_random_model(shape: str, folder: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of mamba-130m's or mamba2-130m's shape (HF format, GPT-NeoX
    tokenizer) in ``folder``, unless one is there already. Random weights change what is generated,
    not how long it takes."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    from rnnserve.bench.compare import NEOX_VOCAB, _save_tokenizer

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "tie_word_embeddings": True}
    shapes = {
        "mamba-130m": (
            MambaForCausalLM,
            MambaConfig(vocab_size=NEOX_VOCAB, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, **ids),
        ),
        "mamba2-130m": (
            Mamba2ForCausalLM,
            # mamba2-130m: 24 heads of 64 (expand 2), one group, state 128, the vocabulary padded to a
            # multiple of 16 (llama.cpp's converter assumes that padding for Mamba-2: a model without it
            # converts, but its GGUF does not load).
            Mamba2Config(
                vocab_size=-(NEOX_VOCAB // -16) * 16,
                hidden_size=768,
                num_hidden_layers=24,
                num_heads=24,
                head_dim=64,
                state_size=128,
                n_groups=1,
                expand=2,
                conv_kernel=4,
                chunk_size=256,
                **ids,
            ),
        ),
    }
    if shape not in shapes:
        raise BenchError(f"unknown --random-shape {shape!r}")
    cls, config = shapes[shape]
    torch.manual_seed(seed)
    model = cls(config)
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="rnnserve bench llamacpp",
        description="rnnserve's engine against llama.cpp (llama-batched-bench, llama-bench) on the same weights.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="checkpoint folder, HF format")
    src.add_argument(
        "--random-shape",
        choices=["mamba-130m", "mamba2-130m"],
        help="make (once) a random-weight checkpoint of this shape in WORK_DIR and use it",
    )
    p.add_argument("--llamacpp-bin", type=Path, default=None, help="folder of llama.cpp's programs (default: PATH)")
    p.add_argument("--converter", type=Path, default=None, help=f"llama.cpp's {CONVERTER_NAME} (default: found)")
    p.add_argument("--converter-python", default=sys.executable, help="the Python that runs the converter")
    p.add_argument("--work-dir", type=Path, default=Path("llamacpp-bench"), help="GGUF files and JSON go here")
    p.add_argument("--precision", choices=sorted(GGUF_TYPES), default="fp32", help="fp32: f32 GGUF; int8: Q8_0")
    p.add_argument("--batch-sizes", type=_int_list, default=(1, 8, 32), help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence before decode")
    p.add_argument("--gen-len", type=int, default=128, help="generated tokens per sequence")
    p.add_argument("--prefill-len", type=int, default=2048, help="prefill benchmark prompt length (0: skip)")
    p.add_argument(
        "--cpu-decode",
        choices=["torch", "fused"],
        default="fused",
        help="rnnserve's CPU decode path (RunnerConfig); fused is what `rnnserve serve` runs by default "
        "(--cpu-decode auto) once its kernels are ready, torch the reference path",
    )
    p.add_argument("--threads", type=int, default=2, help="threads for both engines")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the engine that goes first alternates")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds any one command may take")
    p.add_argument("--label", default=None, help="model name in the table (default: the folder's name)")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompt_len < 1 or args.gen_len < 2 or args.prefill_len < 0 or args.threads < 1 or args.rounds < 1:
        print_error("--prompt-len, --threads and --rounds must be >= 1, --gen-len >= 2, --prefill-len >= 0")
        return 2
    if args.model is not None and not (args.model / "config.json").is_file():
        print_error(f"--model {args.model} is not a checkpoint folder (no config.json)")
        return 2

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        tools = find_tools(args.llamacpp_bin, args.converter, args.converter_python)
        model_dir = args.model or create_random_model(args.random_shape, args.work_dir / args.random_shape)
        settings = Settings(
            model_dir=model_dir,
            work_dir=args.work_dir,
            tools=tools,
            precision=args.precision,
            cpu_decode=args.cpu_decode,
            batch_sizes=args.batch_sizes,
            prompt_len=args.prompt_len,
            gen_len=args.gen_len,
            prefill_len=args.prefill_len,
            threads=args.threads,
            rounds=args.rounds,
            timeout_s=args.timeout,
            rnnserve_python=sys.executable,
        )
        setup_commands: list[str] = []
        gguf = prepare_gguf(settings, log, setup_commands)
        rounds, commands = [], []
        with tempfile.TemporaryDirectory(prefix="rnnserve-llamacpp-") as tmp:
            for i in range(settings.rounds):
                log(f"round {i + 1}/{settings.rounds} ({'rnnserve' if i % 2 == 0 else 'llama.cpp'} first)")
                started = time.perf_counter()
                result = measure_round(settings, gguf, i, Path(tmp), log)
                rounds.append(result["figures"])
                commands = result["commands"]  # the same every round but for the JSON file's name
                log(f"round {i + 1} took {time.perf_counter() - started:.0f} s")
    except BenchError as exc:
        print_error(str(exc))
        return 1
    report = {
        "label": args.label or model_dir.resolve().name,
        "model": str(model_dir),
        "gguf": str(gguf),
        "precision": settings.precision,
        "cpu_decode": settings.cpu_decode,
        "threads": settings.threads,
        "batch_sizes": list(settings.batch_sizes),
        "prompt_len": settings.prompt_len,
        "gen_len": settings.gen_len,
        "prefill_len": settings.prefill_len,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {_loadavg()}",
        "setup_commands": setup_commands,
        "commands": commands,
        "rounds": rounds,
        "summary": summarize(rounds),
    }
    print(format_table(report))
    print(
        f"\n{settings.rounds} rounds, {settings.threads} threads each, engines alternated, rnnserve "
        f"--cpu-decode {settings.cpu_decode}; commands:"
    )
    for cmd in [*setup_commands, *commands]:
        print(f"  {cmd}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
