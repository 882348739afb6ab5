"""TTFT of a well-behaved client while another client bursts, with and without the admission bound
and the per-client fair share.

For each server setting it starts ``rnnserve serve`` on a free port of 127.0.0.1 and runs, in turn:
a quiet phase (the well-behaved client alone: sequential streamed completions), a burst phase
(the same client while a second client fires ``--burst`` requests at once) and a second quiet phase.
The well-behaved client honours ``Retry-After`` on a 429 and counts the wait in its TTFT; the figure
is the p50 / p99 TTFT of its requests (first attempt -> first token). Also printed: the burst's
status counts, the server's RSS before and after (each read after 2 s idle), the engine gauges
once idle, and the CPU seconds the server spent from the burst's start to its last answer, on its
event-loop thread and on its other threads (the engine, torch's workers), and the bursting
client's own CPU seconds. On one machine the clients share the server's cores: the bursting
client's single Python process keeps about one core busy through the burst phase (~4 CPU seconds
for 2,000 requests), so on 2 cores the server has about half the CPU it had in the quiet phases.

The two clients are told apart as the server tells clients apart: each sends its own OpenAI ``user``
(``well-behaved`` and ``burst``), and the burst connects from 127.0.0.2 (loopback, where the system
has it) so that without ``user`` its address differs too.

    .venv/bin/python scripts/ttft_under_burst.py --burst 2000 \
        --setting "no-share=--max-in-flight-per-client 0" --setting "fair=" \
        --setting "unbounded=--max-queued-requests 1000000"

A setting's flags may start with environment variables (``NAME=PYTHONPATH=/tmp/old FLAGS``), e.g. to
compare two source trees; ``--rounds N`` runs every setting N times, interleaved, as a shared
machine's load then falls on all of them alike.

Prints one table and writes the figures to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BODY = {"prompt": "The weather today is", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def idle_rss_mib(pid: int) -> float:
    """RSS after 2 s without requests: the server hands its C heap's free pages back 1 s into an
    idle spell (rnnserve.server.edge), as it would between a burst and the next one."""
    time.sleep(2.0)
    return rss_mib(pid)


def thread_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) the process has used so far: (its main thread, which runs the
    event loop, all its other threads: the engine, torch's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        if task.name == str(pid):
            main += cpu
        else:
            other += cpu
    return main, other


def gauges(base: str) -> dict[str, float]:
    names = (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "rnnserve:state_pool_slots_used",
        "rnnserve:state_pool_slots",
    )
    out = {}
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line.split("{", 1)[0] in names:
            out[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


async def ttft_once(client: httpx.AsyncClient) -> tuple[float, int]:
    """Seconds from the first attempt to the first token, honouring Retry-After; and the 429s seen."""
    start = time.perf_counter()
    rejected = 0
    while True:
        async with client.stream("POST", "/v1/completions", json={**BODY, "stream": True, "user": "well-behaved"}) as r:
            if r.status_code == 429:
                rejected += 1
                await r.aread()
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            r.raise_for_status()
            first = None
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - start
            assert first is not None
            return first, rejected


async def well_behaved(base: str, n: int) -> tuple[list[float], int]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        ttfts, rejected = [], 0
        for _ in range(n):
            t, r = await ttft_once(client)
            ttfts.append(t)
            rejected += r
        return ttfts, rejected


async def burst(base: str, n: int, max_tokens: int) -> dict[int, int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    transport = httpx.AsyncHTTPTransport(limits=limits, local_address=burst_address())
    async with httpx.AsyncClient(base_url=base, timeout=600, transport=transport) as client:

        async def one() -> int:
            try:
                body = {**BODY, "max_tokens": max_tokens, "user": "burst"}
                return (await client.post("/v1/completions", json=body)).status_code
            except httpx.HTTPError:
                return -1

        codes = await asyncio.gather(*(one() for _ in range(n)))
    counts: dict[int, int] = {}
    for c in codes:
        counts[c] = counts.get(c, 0) + 1
    return counts


def burst_address() -> str | None:
    """127.0.0.2 where a socket can bind it (Linux routes all of 127/8 to loopback), else the default."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return None


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _burst_process(base: str, n: int, max_tokens: int, out: multiprocessing.Queue) -> None:
    cpu0 = time.process_time()
    codes = asyncio.run(burst(base, n, max_tokens))
    out.put((codes, time.process_time() - cpu0))


def during_burst(
    base: str, n_quiet: int, n_burst: int, burst_max_tokens: int, server_pid: int
) -> tuple[list[float], int, dict[int, int], tuple[float, float], float]:
    """The burst runs in its own process, so its 2,000 connections do not slow this client's loop.
    Also returns the server's CPU seconds from the burst's start to its last answer (event-loop
    thread, other threads) and the bursting client's own CPU seconds."""
    ctx = multiprocessing.get_context("spawn")
    cpu0 = thread_cpu_s(server_pid)
    out: multiprocessing.Queue = ctx.Queue()
    proc = ctx.Process(target=_burst_process, args=(base, n_burst, burst_max_tokens, out))
    proc.start()
    # The client starts once the burst has filled every slot (and queued or been refused beyond).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        g = gauges(base)
        if g["vllm:num_requests_running"] + g["vllm:num_requests_waiting"] >= g["rnnserve:state_pool_slots"]:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    ttfts, rejected = asyncio.run(well_behaved(base, n_quiet))
    codes, burst_cpu = out.get(timeout=1200)
    cpu1 = thread_cpu_s(server_pid)
    proc.join()
    return ttfts, rejected, codes, (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]), burst_cpu


def run_setting(name: str, extra: list[str], args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    while extra and "=" in extra[0] and extra[0].split("=", 1)[0].isupper():
        key, value = extra.pop(0).split("=", 1)
        env[key] = value
    port = free_port()
    # -P: no current directory on sys.path, so a setting's PYTHONPATH wins over a checkout the
    # script is run from (``-m`` would otherwise import the rnnserve of the working directory).
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "rnnserve",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args.serve_args,
        *extra,
    ]
    log = open(Path(args.out).with_suffix(f".{name}.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        asyncio.run(well_behaved(base, 5))  # warm-up
        rss0 = idle_rss_mib(proc.pid)
        quiet1, _ = asyncio.run(well_behaved(base, args.requests))
        loud, rejected, codes, cpu, burst_cpu = during_burst(
            base, args.requests, args.burst, args.burst_max_tokens, proc.pid
        )
        quiet2, _ = asyncio.run(well_behaved(base, args.requests))
        rss_after = [idle_rss_mib(proc.pid)]
        for _ in range(args.bursts - 1):  # more bursts: a leak keeps growing, allocator pools do not
            asyncio.run(burst(base, args.burst, args.burst_max_tokens))
            rss_after.append(idle_rss_mib(proc.pid))
        quiet = quiet1 + quiet2
        return {
            "setting": name,
            "flags": " ".join(extra),
            "quiet_p50": pct(quiet, 0.5),
            "quiet_p99": pct(quiet, 0.99),
            "burst_p50": pct(loud, 0.5),
            "burst_p99": pct(loud, 0.99),
            "well_behaved_429s": rejected,
            "burst_statuses": codes,
            "burst_cpu_loop_s": cpu[0],
            "burst_cpu_other_s": cpu[1],
            "burst_client_cpu_s": burst_cpu,
            "rss_before_mib": rss0,
            "rss_after_mib": rss_after[0],
            "rss_after_each_burst_mib": rss_after,
            "quiet_ttfts": quiet,
            "burst_ttfts": loud,
            "gauges_after": gauges(base),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--burst", type=int, default=2000, help="requests the bursting client fires at once")
    p.add_argument("--burst-max-tokens", type=int, default=64, help="tokens each burst request generates")
    p.add_argument("--bursts", type=int, default=1, help="bursts in a row (RSS is read after each)")
    p.add_argument("--requests", type=int, default=40, help="well-behaved requests per phase")
    p.add_argument("--serve-args", type=shlex.split, default=[], help="flags for every server, e.g. '--model DIR'")
    p.add_argument("--setting", action="append", default=[], help="NAME=FLAGS, one server per setting")
    p.add_argument("--rounds", type=int, default=1, help="run every setting this many times, interleaved")
    p.add_argument("--out", default="ttft_under_burst.json")
    args = p.parse_args(argv)
    settings = [s.split("=", 1) for s in args.setting] or [["bounded", ""]]
    rows = [run_setting(name, shlex.split(flags), args) for _ in range(args.rounds) for name, flags in settings]
    print(f"{'setting':<12} {'quiet p50':>9} {'quiet p99':>9} {'burst p50':>9} {'burst p99':>9} {'ratio':>6} "
          f"{'429s':>5} {'RSS MiB before/after':>21}  burst statuses")  # fmt: skip
    for r in rows:
        ratio = r["burst_p99"] / r["quiet_p99"]
        print(
            f"{r['setting']:<12} {r['quiet_p50']:9.3f} {r['quiet_p99']:9.3f} {r['burst_p50']:9.3f} "
            f"{r['burst_p99']:9.3f} {ratio:6.2f} {r['well_behaved_429s']:5d} "
            f"{r['rss_before_mib']:10.0f}/{r['rss_after_mib']:<10.0f}  {r['burst_statuses']}"
        )
        print(f"{'':<12} after: {r['gauges_after']}; RSS MiB after each burst: {r['rss_after_each_burst_mib']}")
        print(
            f"{'':<12} server CPU s in the burst: event loop {r['burst_cpu_loop_s']:.2f}, "
            f"other threads {r['burst_cpu_other_s']:.2f}; the bursting client {r['burst_client_cpu_s']:.2f}"
        )
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
