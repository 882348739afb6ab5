"""Multi-turn chat with and without the prefix state cache: one random-weight Mamba-130m-shaped model
(NeoX tokenizer, the chat template of ``rnnserve bench compare``), served twice by ``rnnserve serve``
on 127.0.0.1 (``--enable-prefix-caching`` and ``--no-enable-prefix-caching``), each run measured by
``rnnserve bench chat`` with the same seed, so both servers see the same conversations.

    .venv/bin/python scripts/bench_chat_cache.py --out bench-chat [--conversations 8 --turns 10
        --user-len 200 --answer-len 128 --think-time 0]

Writes OUT/cache.json, OUT/no-cache.json and OUT/ttft-per-turn.png and prints both summaries and
turn-T TTFT of each with their ratio.

Issue 11's target, side by side with llama.cpp's ``llama-server`` on the same weights (converted to
an f32 GGUF by llama.cpp's converter, or ``--gguf``), every server at ``--threads`` threads and each
conversation one growing prompt of token ids (``rnnserve bench chat --token-ids``):

    .venv/bin/python scripts/bench_chat_cache.py --out bench-chat --model-dir DIR --token-ids --threads 2 \
        --llama-server /tmp/llamacpp/build/bin/llama-server --converter /tmp/llamacpp/llama.cpp/convert_hf_to_gguf.py

``llama-server`` runs with ``-t/-tb THREADS -np CONVERSATIONS``, a context of 4096 tokens per slot
(``--llama-ctx-per-slot``), its checkpoint and prompt-cache defaults spelled out (``--ctx-checkpoints
32 --cache-ram 8192``) and ``cache_prompt`` on every request. ``--runs`` picks which of cache,
no-cache and llama-server run (in that order, one at a time). Also writes OUT/report.md: per turn the
mean prompt, each run's cached share and TTFT median / max, and the turn-T ratios against the
issue's targets. ``--serve-args`` adds flags to rnnserve's runs (``'--prefill-pack-tokens 2048'``: every
prompt of a step packed into it, as the scheduler did before first come, first prefilled).

``--engine`` measures the same thing without HTTP, tokenizer or other conversations: one
conversation of token ids (each answer's ids appended as generated), two engines over one model
(with and without the cache), and per turn the time from adding the request to its first token on
each engine, back to back, so a shared machine's load hits both alike (the uncached engine stops
at its first token, which must equal the cached engine's). Writes OUT/engine.json. ``--model-dir``
measures another model folder that way instead (a hybrid, the Llama baseline: their cache entries
hold KV blocks too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from rnnserve.bench.chat import ChatBenchConfig, format_summary, plot, run_benchmark
from rnnserve.bench.compare import PRESETS, create_models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: Path, cache: bool, port: int, log: Path, threads: int, extra: Sequence[str] = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "rnnserve", "serve", "--model", str(model), "--port", str(port)]
    args += ["--dtype", "float32", "--max-num-seqs", "16", "--log-level", "warning"]
    args += ["--enable-prefix-caching" if cache else "--no-enable-prefix-caching", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return wait_healthy(subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env), port, log)


def llama_server_args(binary: Path, gguf: Path, port: int, threads: int, slots: int, ctx_per_slot: int) -> list[str]:
    """llama-server with one slot per conversation; a recurrent model's slot keeps its state after a
    request, so a prompt that extends the slot's tokens resumes there. The checkpoint and prompt-cache
    settings are its defaults, spelled out (checkpoints restore a state when a prompt diverges
    inside the slot's tokens; the RAM cache keeps slots' states when a slot is reused)."""
    return [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
        "--ctx-checkpoints", "32", "--cache-ram", "8192", "--no-webui",
    ]  # fmt: skip


def convert_to_gguf(converter: Path, model: Path, out: Path) -> Path:
    """llama.cpp's converter to an f32 GGUF (its own gguf-py on PYTHONPATH), unless ``out`` is newer
    than the checkpoint's files."""
    newest = max(f.stat().st_mtime for f in model.iterdir() if f.is_file())
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    partial = out.with_name(out.name + ".partial")
    env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
    argv = [sys.executable, str(converter), str(model), "--outtype", "f32", "--outfile", str(partial)]
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    partial.replace(out)
    return out


def wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> subprocess.Popen:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError("the server did not come up in 10 minutes")


def _turn_row(s: dict, turn: int) -> dict:
    return next(r for r in s["per_turn"] if r["turn"] == turn)


def report(runs: Sequence[tuple[str, dict]], turns: int) -> str:
    """Per turn, each run's cached share and TTFT median / max; then the turn-``turns`` ratios
    against issue 11's targets (10x vs no cache, >= 90% cached from turn 2, <= 1/3 of llama-server)."""
    head = "| turn | prompt tokens |" + "".join(f" {label}: cached, TTFT p50 / max |" for label, _ in runs)
    lines = [head, "|---:|---:|" + "---:|" * len(runs)]
    for t in range(1, turns + 1):
        rows = [_turn_row(s, t) for _, s in runs]
        cells = []
        for row in rows:
            cached = "n/a" if row["cached_ratio"] is None else f"{row['cached_ratio']:.0%}"
            cells.append(
                f" {cached}, {row['median_ttft_ms'] / 1000:.2f} / {row.get('max_ttft_ms', 0.0) / 1000:.2f} s |"
            )
        lines.append(f"| {t} | {rows[0]['mean_prompt_tokens']:.0f} |" + "".join(cells))
    by = dict(runs)
    last = {label: _turn_row(s, turns)["median_ttft_ms"] for label, s in runs}
    lines.append("")
    if "cache" in by and "no-cache" in by:
        ratio = last["no-cache"] / max(last["cache"], 1e-9)
        lines.append(f"- turn {turns} TTFT p50, no cache / cache: {ratio:.1f}x (target >= 10x)")
    if "cache" in by:
        share = by["cache"]["cached_ratio_after_turn_1"]
        lines.append(
            f"- cached share of prompt tokens from turn 2 on, with the cache: {share or 0:.1%} (target >= 90%)"
        )
    if "cache" in by and "llama-server" in by:
        ratio = last["cache"] / max(last["llama-server"], 1e-9)
        lines.append(f"- turn {turns} TTFT p50, rnnserve with the cache / llama-server: {ratio:.2f} (target <= 0.33)")
        share = by["llama-server"]["cached_ratio_after_turn_1"]
        lines.append(f"- llama-server's cached share from turn 2 on (timings.cache_n / prompt): {share or 0:.1%}")
    if len({s.get("user_messages_sha256") for _, s in runs}) > 1:
        lines.append("- the runs' user messages differ (user_messages_sha256): their tokenizers do not agree")
    for label, s in runs:
        lines.append(
            f"- {label}: {s['completed']} turns done, {s['failed']} failed, {s['duration']:.0f} s, "
            f"load average {s.get('load_before', '?')} before, {s.get('load_after', '?')} after"
        )
    return "\n".join(lines)


def engine_ttft(model_dir: Path, turns: int, user_len: int, answer_len: int) -> dict:
    """Per turn, the first-token time of the same request on an engine with and one without the cache
    (the first tokens must agree)."""
    import torch

    from rnnserve.config import ModelConfig, PrefixCacheConfig, RunnerConfig, SchedulerConfig, StatePoolConfig
    from rnnserve.engine import LLMEngine, SamplingParams
    from rnnserve.models.loader import load_model

    model = load_model(ModelConfig(model=str(model_dir), dtype="float32", device="cpu")).model

    def make(cache: PrefixCacheConfig | None) -> LLMEngine:
        return LLMEngine(
            model,
            StatePoolConfig(max_num_seqs=2),
            SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=2),
            RunnerConfig(),
            eos_token_id=None,
            prefix_cache_config=cache,
        )

    engines = {"cache": make(PrefixCacheConfig()), "no-cache": make(None)}
    g = torch.Generator().manual_seed(0)
    history: list[int] = []
    rows = []
    for t in range(1, turns + 1):
        history += torch.randint(10, model.vocab_size, (user_len,), generator=g).tolist()
        row: dict = {"turn": t, "prompt_tokens": len(history)}
        answers = {}
        for label, engine in engines.items():
            # Only the cached engine needs the whole answer (the next turn resends it); the other one
            # stops at its first token, which must be the same.
            n = answer_len if label == "cache" else 1
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            engine.add_request(f"t{t}", history, params)
            start = time.perf_counter()
            tokens: list[int] = []
            cached = 0
            while engine.has_unfinished():
                for out in engine.step():
                    if out.new_token_ids and not tokens:
                        row[f"{label}_ttft_ms"] = (time.perf_counter() - start) * 1000
                    tokens += out.new_token_ids
                    cached = out.num_cached_tokens
            row[f"{label}_cached_tokens"] = cached
            answers[label] = tokens
        assert answers["cache"][:1] == answers["no-cache"], f"turn {t}: the cache changed the first token"
        history += answers["cache"]
        rows.append(row)
        print(
            f"turn {t:>2}: {row['prompt_tokens']:>5} prompt tokens, {row['cache_cached_tokens']:>5} cached; "
            f"TTFT {row['cache_ttft_ms']:8.0f} ms with the cache, {row['no-cache_ttft_ms']:8.0f} ms without",
            flush=True,
        )
    return {"turns": rows, "user_len": user_len, "answer_len": answer_len, "cpu_count": os.cpu_count()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-chat"))
    p.add_argument("--models", type=Path, default=Path("bench-models"), help="where the random model is kept")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--user-len", type=int, default=200)
    p.add_argument("--answer-len", type=int, default=128)
    p.add_argument("--think-time", type=float, default=0.0)
    p.add_argument("--engine", action="store_true", help="measure in-process, without HTTP (see above)")
    p.add_argument("--model-dir", type=Path, default=None, help="this model folder instead of the random one")
    p.add_argument("--token-ids", action="store_true", help="rnnserve bench chat --token-ids (the same prompts)")
    p.add_argument("--llama-server", type=Path, default=None, help="also run llama.cpp's llama-server (this binary)")
    p.add_argument("--converter", type=Path, default=None, help="llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--gguf", type=Path, default=None, help="llama-server's model (default: OUT/model-f32.gguf)")
    p.add_argument("--llama-ctx-per-slot", type=int, default=4096, help="llama-server context per conversation")
    p.add_argument("--runs", default="cache,no-cache,llama-server", help="which runs, comma-separated")
    p.add_argument(
        "--serve-args",
        default="",
        help="more rnnserve serve flags for the cache and no-cache runs, e.g. '--prefill-pack-tokens 2048' "
        "(the scheduler before first-come-first-prefilled)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the servers / the in-process engines (on a shared machine one thread avoids "
        "waiting at OpenMP barriers for descheduled threads)",
    )
    args = p.parse_args()
    labels = [r for r in args.runs.split(",") if r]
    if unknown := set(labels) - {"cache", "no-cache", "llama-server"}:
        p.error(f"unknown --runs {sorted(unknown)}")
    if args.llama_server is None:
        labels = [r for r in labels if r != "llama-server"]
    elif not args.token_ids:
        p.error("--llama-server needs --token-ids (llama.cpp's /completion returns the answer's ids, not chat text)")
    elif args.gguf is None and args.converter is None:
        p.error("--llama-server needs --gguf or --converter")
    mamba = args.model_dir or create_models(PRESETS["130m"], args.models)[0]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.engine:
        import torch

        torch.set_num_threads(args.threads)
        result = engine_ttft(mamba, args.turns, args.user_len, args.answer_len)
        (args.out / "engine.json").write_text(json.dumps(result, indent=2))
        return 0
    runs = []
    for label in labels:
        port = free_port()
        log = args.out / f"{label}-server.log"
        if label == "llama-server":
            gguf = args.gguf or convert_to_gguf(args.converter, mamba, args.out / "model-f32.gguf")
            argv = llama_server_args(
                args.llama_server, gguf, port, args.threads, args.conversations, args.llama_ctx_per_slot
            )
            print("$ " + " ".join(argv), flush=True)
            server = wait_healthy(subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT), port, log)
        else:
            server = serve(mamba, label == "cache", port, log, args.threads, shlex.split(args.serve_args))
        try:
            cfg = ChatBenchConfig(
                base_url=f"http://127.0.0.1:{port}",
                conversations=args.conversations,
                turns=args.turns,
                user_len=args.user_len,
                answer_len=args.answer_len,
                think_time=args.think_time,
                timeout_s=3600,
                token_ids=args.token_ids,
                api="llamacpp" if label == "llama-server" else "openai",
                progress=True,
            )
            load_before = round(os.getloadavg()[0], 1)
            summary = asyncio.run(run_benchmark(cfg))
            summary |= {
                "server_args": "" if label == "llama-server" else args.serve_args,
                "cpu_count": os.cpu_count(),
                "load_before": load_before,
                "load_after": round(os.getloadavg()[0], 1),
            }
        finally:
            server.terminate()
            server.wait(timeout=60)
        (args.out / f"{label}.json").write_text(json.dumps(summary, indent=2))
        print(f"== {label}")
        print(format_summary(summary), flush=True)
        runs.append((label, summary))
    text = report(runs, args.turns)
    (args.out / "report.md").write_text(text + "\n")
    print(text)
    plot(runs, args.out / "ttft-per-turn.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
