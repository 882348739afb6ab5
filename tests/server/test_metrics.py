"""Prometheus series: vLLM names, per-app registries, engine gauges read at scrape time."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from rnnserve.server.metrics import ServerMetrics


@dataclass(frozen=True)
class _Stats:
    num_running: int = 2
    num_waiting: int = 1
    num_slots: int = 8
    slots_used: int = 2
    state_bytes_per_slot: int = 4096
    state_pool_usage: float = 0.25
    prompt_tokens_total: int = 100
    generation_tokens_total: int = 40
    num_steps: int = 12
    last_step_seconds: float = 0.01


def _samples(m: ServerMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_names_labels_and_values() -> None:
    m = ServerMetrics("tiny", _Stats)
    m.observe_ttft(0.05)
    m.observe_itl(0.01)
    m.observe_finish("length", 0.5)
    s = _samples(m)
    label = (("model_name", "tiny"),)
    assert s[("vllm:num_requests_running", label)] == 2
    assert s[("vllm:num_requests_waiting", label)] == 1
    assert s[("vllm:kv_cache_usage_perc", label)] == 0.25
    assert s[("rnnserve:state_pool_usage", label)] == 0.25
    assert s[("rnnserve:state_bytes_per_slot", label)] == 4096
    assert s[("rnnserve:state_pool_slots", label)] == 8
    assert s[("rnnserve:engine_step_seconds", label)] == 0.01
    assert s[("vllm:prompt_tokens_total", label)] == 100
    assert s[("vllm:generation_tokens_total", label)] == 40
    assert s[("vllm:time_to_first_token_seconds_count", label)] == 1
    assert s[("vllm:inter_token_latency_seconds_count", label)] == 1
    assert s[("vllm:time_per_output_token_seconds_count", label)] == 1
    assert s[("vllm:e2e_request_latency_seconds_count", label)] == 1
    assert s[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "tiny")))] == 1
    assert s[("vllm:request_success_total", (("finished_reason", "stop"), ("model_name", "tiny")))] == 0


def test_two_apps_do_not_share_series() -> None:
    a, b = ServerMetrics("a"), ServerMetrics("b")
    a.observe_finish("stop", 1.0)
    sb = _samples(b)
    assert sb[("vllm:request_success_total", (("finished_reason", "stop"), ("model_name", "b")))] == 0


def test_a_failing_stats_call_does_not_break_the_scrape() -> None:
    def broken() -> _Stats:
        raise RuntimeError("engine not started")

    s = _samples(ServerMetrics("x", broken))
    assert not any(name == "vllm:num_requests_running" for name, _ in s)
    assert any(name == "vllm:e2e_request_latency_seconds_count" for name, _ in s)


def test_process_resident_memory_is_exported() -> None:
    import os
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("prometheus_client reads process_* series from /proc")
    s = _samples(ServerMetrics("x", _Stats))
    rss = s[("process_resident_memory_bytes", ())]
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    assert rss > 0 and abs(rss - pages * os.sysconf("SC_PAGE_SIZE")) < 256 * 2**20
