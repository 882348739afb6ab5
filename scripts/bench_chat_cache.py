"""Multi-turn chat with and without the prefix state cache: one random-weight Mamba-130m-shaped model
(NeoX tokenizer, the chat template of ``rnnserve bench compare``), served twice by ``rnnserve serve``
on 127.0.0.1 (``--enable-prefix-caching`` and ``--no-enable-prefix-caching``), each run measured by
``rnnserve bench chat`` with the same seed, so both servers see the same conversations.

    .venv/bin/python scripts/bench_chat_cache.py --out bench-chat [--conversations 8 --turns 10
        --user-len 200 --answer-len 128 --think-time 0]

Writes OUT/cache.json, OUT/no-cache.json and OUT/ttft-per-turn.png and prints both summaries and
turn-T TTFT of each with their ratio.

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
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rnnserve.bench.chat import ChatBenchConfig, format_summary, plot, run_benchmark
from rnnserve.bench.compare import PRESETS, create_models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: Path, cache: bool, port: int, log: Path, threads: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "rnnserve", "serve", "--model", str(model), "--port", str(port)]
    args += ["--dtype", "float32", "--max-num-seqs", "16", "--log-level", "warning"]
    args += ["--enable-prefix-caching" if cache else "--no-enable-prefix-caching"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
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
    p.add_argument("--model-dir", type=Path, default=None, help="with --engine: this model folder instead")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the servers / the in-process engines (on a shared machine one thread avoids "
        "waiting at OpenMP barriers for descheduled threads)",
    )
    args = p.parse_args()
    if args.model_dir is not None and not args.engine:
        p.error("--model-dir needs --engine")
    mamba = args.model_dir or create_models(PRESETS["130m"], args.models)[0]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.engine:
        import torch

        torch.set_num_threads(args.threads)
        result = engine_ttft(mamba, args.turns, args.user_len, args.answer_len)
        (args.out / "engine.json").write_text(json.dumps(result, indent=2))
        return 0
    runs = []
    for label, cache in (("cache", True), ("no-cache", False)):
        port = free_port()
        server = serve(mamba, cache, port, args.out / f"{label}-server.log", args.threads)
        try:
            cfg = ChatBenchConfig(
                base_url=f"http://127.0.0.1:{port}",
                conversations=args.conversations,
                turns=args.turns,
                user_len=args.user_len,
                answer_len=args.answer_len,
                think_time=args.think_time,
                timeout_s=3600,
            )
            summary = asyncio.run(run_benchmark(cfg))
            summary["cpu_count"] = os.cpu_count()
        finally:
            server.terminate()
            server.wait(timeout=60)
        (args.out / f"{label}.json").write_text(json.dumps(summary, indent=2))
        print(f"== {label}")
        print(format_summary(summary))
        runs.append((label, summary))
    plot(runs, args.out / "ttft-per-turn.png")
    last = {label: s["per_turn"][-1]["mean_ttft_ms"] for label, s in runs}
    print(
        f"turn {args.turns} mean TTFT: cache {last['cache']:.0f} ms, no cache {last['no-cache']:.0f} ms "
        f"({last['no-cache'] / max(last['cache'], 1e-9):.1f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
