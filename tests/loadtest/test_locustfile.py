"""The locustfile runs headless for a dozen requests against a live server with zero failures and
reports TTFT, ITL, output tokens/s and E2E as locust events."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bench.stub_openai import stub_server

LOCUSTFILE = Path(__file__).resolve().parents[2] / "rnnserve" / "loadtest" / "locustfile.py"
METRICS = ("TTFT (ms)", "ITL (ms)", "output tokens/s", "E2E (ms)")


def locust_command() -> list[str]:
    exe = Path(sys.executable).with_name("locust")
    if exe.exists():
        return [str(exe)]
    if shutil.which("locust"):
        return ["locust"]
    pytest.skip("locust is not installed")


@dataclass(frozen=True)
class Stat:
    count: int
    failures: int
    mean: float  # mean "response time" (ms; tokens/s for the throughput event)


def run_headless(
    host: str, tmp_path: Path, extra: list[str], requests: int = 12, expect_rc: int = 0
) -> dict[str, Stat]:
    """Run the locustfile headless until ``requests`` streamed requests have ended (a 90 s run
    time only as a backstop on a slow machine); return its final stats by name."""
    prefix = tmp_path / "locust"  # locust adds ".json"
    cmd = [
        *locust_command(),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        "3",
        "-r",
        "3",
        "-t",
        "90s",
        "--max-requests",
        str(requests),
        "--host",
        host,
        "--json-file",
        str(prefix),
        "--only-summary",
        "--stop-timeout",
        "5",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    entries = json.loads(Path(f"{prefix}.json").read_text())
    return {
        e["name"]: Stat(e["num_requests"], e["num_failures"], e["total_response_time"] / max(1, e["num_requests"]))
        for e in entries
    }


def check_stats(stats: dict[str, Stat], path: str) -> None:
    assert sum(s.failures for s in stats.values()) == 0
    assert stats[f"POST {path}"].count > 0
    for name in METRICS:
        assert stats[name].count > 0 and stats[name].mean > 0, name
    assert stats["E2E (ms)"].mean > stats["TTFT (ms)"].mean


def test_locust_headless_completions(tmp_path: Path) -> None:
    with stub_server(token_delay_s=0.003) as stub:
        stats = run_headless(stub.url, tmp_path, ["--input-len", "12", "--output-len", "5"])
        bodies = list(stub.requests)
    check_stats(stats, "/v1/completions")
    # --max-requests ended the run after 12 requests, plus what the other 2 users had in flight
    n = stats["POST /v1/completions"].count
    assert 12 <= n <= 14
    # ITL events: one per gap, (output-len - 1) per request
    assert stats["ITL (ms)"].count == 4 * stats["TTFT (ms)"].count == 4 * n
    # Over the whole request: 5 tokens take at least 5 x 3 ms here, so never above 1 / 3 ms.
    assert 0 < stats["output tokens/s"].mean <= 1 / 0.003
    assert bodies and all(b["model"] == "stub-model" and b["max_tokens"] == 5 and b["ignore_eos"] for b in bodies)


def test_locust_headless_chat_fails_on_bad_model(tmp_path: Path) -> None:
    with stub_server(token_delay_s=0.003) as stub:
        stats = run_headless(stub.url, tmp_path, ["--endpoint", "chat", "--output-len", "4"], requests=6)
        check_stats(stats, "/v1/chat/completions")
        # A model the server lacks: every request fails and locust exits non-zero.
        bad = run_headless(stub.url, tmp_path, ["--model", "missing", "--output-len", "2"], requests=4, expect_rc=1)
    assert bad["POST /v1/completions"].failures == bad["POST /v1/completions"].count > 0
    assert "TTFT (ms)" not in bad
