"""The prefix cache's memory budgets under many conversations: a live ``rnnserve serve`` with small
``--prefix-cache-memory`` / ``--prefix-cache-host-memory`` budgets, driven by ``rnnserve bench chat``
(``--conversations`` distinct conversations of ``--turns`` short turns, ``--concurrency`` at a time),
while a sampler thread scrapes ``/metrics`` every ``--interval`` seconds: snapshot bytes per tier
(``rnnserve:prefix_cache_bytes{tier}``), entries, evictions, ``vllm:prefix_cache_hits`` / ``queries``
and the server's resident memory (``process_resident_memory_bytes``).

    .venv/bin/python scripts/bench_cache_memory.py --out bench-cache-memory [--conversations 1000
        --turns 3 --concurrency 8 --user-len 24 --answer-len 8 --device-memory 4MiB --host-memory 32MiB]

The model is a random-weight Mamba of ``rnnserve bench compare``'s ``--size`` shape (default
``small``: 8 layers, d_model 256, 307 KiB of state per snapshot), so the budgets fill within the
first few dozen conversations and stay full. Writes OUT/samples.json (every scrape), OUT/chat.json
(``rnnserve bench chat --json``) and OUT/summary.json, prints a summary, and exits 1 when a check
fails: bytes per tier never above their budget, evictions and spills to the host tier happened, hits
happened in the run's second half too, and resident memory in the second half grew by less than
``--rss-slack`` over its first-half peak (an unbounded cache would keep growing by one snapshot per
insert).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rnnserve.bench.chat import ChatBenchConfig, format_summary, run_benchmark
from rnnserve.bench.compare import PRESETS, create_models, launch_server
from rnnserve.cli import parse_bytes

MiB = 2**20


def scrape(url: str) -> dict[str, float]:
    """The series this benchmark follows from one ``/metrics`` scrape."""
    text = httpx.get(f"{url}/metrics", timeout=30.0).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "rnnserve:prefix_cache_bytes":
                out[f"bytes_{s.labels['tier']}"] = s.value
            elif s.name in (
                "rnnserve:prefix_cache_entries",
                "rnnserve:prefix_cache_evictions_total",
                "vllm:prefix_cache_hits_total",
                "vllm:prefix_cache_queries_total",
                "vllm:request_success_total",
                "process_resident_memory_bytes",
            ):
                key = s.name.split(":")[-1].removesuffix("_total")
                out[key] = out.get(key, 0.0) + s.value  # request_success: summed over finish reasons
    return out


class Sampler(threading.Thread):
    """Scrapes ``/metrics`` every ``interval`` seconds until ``stop`` is set (and once more then)."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()
        self._start = time.monotonic()

    def _sample(self) -> None:
        row = scrape(self.url)
        row["t"] = time.monotonic() - self._start
        self.samples.append(row)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self._sample()
        self._sample()


def check(samples: list[dict[str, float]], device_budget: int, host_budget: int, rss_slack: int) -> dict:
    """The figures and the pass/fail of each check (see the module docstring)."""
    half = len(samples) // 2
    first, second = samples[:half], samples[half:]
    peak = {tier: max(s[f"bytes_{tier}"] for s in samples) for tier in ("device", "host")}
    rss_first = max(s["process_resident_memory_bytes"] for s in first)
    rss_second = max(s["process_resident_memory_bytes"] for s in second)
    end, mid = samples[-1], samples[half]
    figures = {
        "samples": len(samples),
        "duration_s": end["t"],
        "device_budget": device_budget,
        "host_budget": host_budget,
        "peak_device_bytes": peak["device"],
        "peak_host_bytes": peak["host"],
        "max_entries": max(s["prefix_cache_entries"] for s in samples),
        "evictions": end["prefix_cache_evictions"],
        "hits_tokens": end["prefix_cache_hits"],
        "queries_tokens": end["prefix_cache_queries"],
        "hits_tokens_second_half": end["prefix_cache_hits"] - mid["prefix_cache_hits"],
        "requests": end["request_success"],
        "rss_start": samples[0]["process_resident_memory_bytes"],
        "rss_peak_first_half": rss_first,
        "rss_peak_second_half": rss_second,
    }
    figures["checks"] = {
        "device tier within budget": peak["device"] <= device_budget,
        "host tier within budget": peak["host"] <= host_budget,
        "snapshots spilled to the host tier": peak["host"] > 0,
        "evictions happened": figures["evictions"] > 0,
        "hits in the second half": figures["hits_tokens_second_half"] > 0,
        "resident memory bounded": rss_second - rss_first < rss_slack,
    }
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-cache-memory"))
    p.add_argument("--models", type=Path, default=Path("bench-models"), help="where the random model is kept")
    p.add_argument("--size", choices=sorted(PRESETS), default="small", help="bench compare's model shape")
    p.add_argument("--conversations", type=int, default=1000)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--user-len", type=int, default=24)
    p.add_argument("--answer-len", type=int, default=8)
    p.add_argument("--device-memory", type=parse_bytes, default=4 * MiB, help="--prefix-cache-memory")
    p.add_argument("--host-memory", type=parse_bytes, default=32 * MiB, help="--prefix-cache-host-memory")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between /metrics scrapes")
    p.add_argument("--rss-slack", type=parse_bytes, default=64 * MiB, help="allowed second-half RSS growth")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (OMP_NUM_THREADS)")
    args = p.parse_args()
    model = create_models(PRESETS[args.size], args.models)[0]
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server inherits it
    serve_args = ["--dtype", "float32", "--max-num-seqs", str(2 * args.concurrency), "--log-level", "warning",
                  "--prefix-cache-memory", str(args.device_memory),
                  "--prefix-cache-host-memory", str(args.host_memory)]  # fmt: skip
    with launch_server(model, serve_args, args.out / "server.log") as url:
        sampler = Sampler(url, args.interval)
        sampler.start()
        try:
            cfg = ChatBenchConfig(
                base_url=url,
                conversations=args.conversations,
                turns=args.turns,
                user_len=args.user_len,
                answer_len=args.answer_len,
                concurrency=args.concurrency,
                timeout_s=600,
            )
            chat = asyncio.run(run_benchmark(cfg))
        finally:
            sampler.stop.set()
            sampler.join(60)
    (args.out / "chat.json").write_text(json.dumps(chat, indent=2))
    (args.out / "samples.json").write_text(json.dumps(sampler.samples, indent=1))
    print(format_summary(chat))
    figures = check(sampler.samples, args.device_memory, args.host_memory, args.rss_slack)
    figures["failed_turns"] = chat["failed"]
    figures["checks"]["no failed turns"] = chat["failed"] == 0
    (args.out / "summary.json").write_text(json.dumps(figures, indent=2))
    print(
        f"{figures['samples']} scrapes over {figures['duration_s']:.0f} s, {figures['requests']:.0f} requests\n"
        f"snapshot bytes, peak: device {figures['peak_device_bytes'] / MiB:.2f} MiB of {args.device_memory / MiB:.2f}, "
        f"host {figures['peak_host_bytes'] / MiB:.2f} MiB of {args.host_memory / MiB:.2f} "
        f"(at most {figures['max_entries']:.0f} entries)\n"
        f"evictions {figures['evictions']:.0f}; hits {figures['hits_tokens']:.0f} of {figures['queries_tokens']:.0f} "
        f"prompt tokens ({figures['hits_tokens_second_half']:.0f} in the second half)\n"
        f"RSS: {figures['rss_start'] / MiB:.0f} MiB at the start, peak {figures['rss_peak_first_half'] / MiB:.0f} MiB "
        f"in the first half, {figures['rss_peak_second_half'] / MiB:.0f} MiB in the second"
    )
    for name, ok in figures["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(figures["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
