"""Multi-turn chat with and without the prefix state cache: one random-weight Mamba-130m-shaped model
(NeoX tokenizer, the chat template of ``rnnserve bench compare``), served twice by ``rnnserve serve``
on 127.0.0.1 (``--enable-prefix-caching`` and ``--no-enable-prefix-caching``), each run measured by
``rnnserve bench chat`` with the same seed, so both servers see the same conversations.

    .venv/bin/python scripts/bench_chat_cache.py --out bench-chat [--conversations 8 --turns 10
        --user-len 200 --answer-len 128 --think-time 0]

Writes OUT/cache.json, OUT/no-cache.json and OUT/ttft-per-turn.png and prints both summaries and
turn-T TTFT of each with their ratio.
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


def serve(model: Path, cache: bool, port: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "rnnserve", "serve", "--model", str(model), "--port", str(port)]
    args += ["--dtype", "float32", "--max-num-seqs", "16", "--log-level", "warning"]
    args += ["--enable-prefix-caching" if cache else "--no-enable-prefix-caching"]
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-chat"))
    p.add_argument("--models", type=Path, default=Path("bench-models"), help="where the random model is kept")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--user-len", type=int, default=200)
    p.add_argument("--answer-len", type=int, default=128)
    p.add_argument("--think-time", type=float, default=0.0)
    args = p.parse_args()
    mamba, _, _ = create_models(PRESETS["130m"], args.models)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for label, cache in (("cache", True), ("no-cache", False)):
        port = free_port()
        server = serve(mamba, cache, port, args.out / f"{label}-server.log")
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
