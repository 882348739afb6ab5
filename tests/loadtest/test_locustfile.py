"""The locustfile runs headless for a few seconds against a live server with zero failures and
reports TTFT, ITL, output tokens/s and E2E as locust events."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
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


def run_headless(
    host: str, tmp_path: Path, extra: list[str], seconds: int = 4, expect_rc: int = 0
) -> dict[str, dict[str, str]]:
    """Run the locustfile headless; return its aggregated CSV stats by name."""
    prefix = tmp_path / "locust"
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
        f"{seconds}s",
        "--host",
        host,
        "--csv",
        str(prefix),
        "--only-summary",
        "--stop-timeout",
        "5",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def check_stats(stats: dict[str, dict[str, str]], path: str) -> None:
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    assert int(stats[f"POST {path}"]["Request Count"]) > 0
    for name in METRICS:
        assert int(stats[name]["Request Count"]) > 0, name
        assert float(stats[name]["Average Response Time"]) > 0, name
    assert float(stats["E2E (ms)"]["Average Response Time"]) > float(stats["TTFT (ms)"]["Average Response Time"])


def test_locust_headless_completions(tmp_path: Path) -> None:
    with stub_server(token_delay_s=0.003) as stub:
        stats = run_headless(stub.url, tmp_path, ["--input-len", "12", "--output-len", "5"])
        bodies = list(stub.requests)
    check_stats(stats, "/v1/completions")
    # ITL events: one per gap, so about (output-len - 1) per completed request
    assert int(stats["ITL (ms)"]["Request Count"]) >= 4 * int(stats["TTFT (ms)"]["Request Count"]) - 12
    assert bodies and all(b["model"] == "stub-model" and b["max_tokens"] == 5 and b["ignore_eos"] for b in bodies)


def test_locust_headless_chat_fails_on_bad_model(tmp_path: Path) -> None:
    with stub_server(token_delay_s=0.003) as stub:
        stats = run_headless(stub.url, tmp_path, ["--endpoint", "chat", "--output-len", "4"], seconds=2)
        check_stats(stats, "/v1/chat/completions")
        # A model the server lacks: every request fails and locust exits non-zero.
        bad = run_headless(stub.url, tmp_path, ["--model", "missing", "--output-len", "2"], seconds=2, expect_rc=1)
    assert int(bad["POST /v1/completions"]["Failure Count"]) == int(bad["POST /v1/completions"]["Request Count"]) > 0
    assert "TTFT (ms)" not in bad
