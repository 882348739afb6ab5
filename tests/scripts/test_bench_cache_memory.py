"""scripts/bench_cache_memory.py's verdict on a run's /metrics samples: within budget, evictions,
hits late in the run and bounded RSS pass; a tier over its budget or RSS that keeps growing fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_cache_memory.py"
MiB = 2**20


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cache_memory", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def samples(n: int, device: float, host: float, rss_growth_per_sample: float) -> list[dict[str, float]]:
    return [
        {
            "t": 0.5 * i,
            "bytes_device": min(device, i * MiB),
            "bytes_host": min(host, i * MiB),
            "prefix_cache_entries": 10.0,
            "prefix_cache_evictions": float(max(0, i - 20)),
            "prefix_cache_hits": 100.0 * i,
            "prefix_cache_queries": 300.0 * i,
            "request_success": 3.0 * i,
            "process_resident_memory_bytes": 600 * MiB + i * rss_growth_per_sample,
        }
        for i in range(n)
    ]


def test_a_run_within_its_budgets_passes(script: ModuleType) -> None:
    figures = script.check(samples(100, 4 * MiB, 32 * MiB, 0.0), 4 * MiB, 32 * MiB, 64 * MiB)
    assert all(figures["checks"].values()), figures["checks"]
    assert figures["peak_device_bytes"] == 4 * MiB and figures["evictions"] == 79


def test_a_tier_over_budget_or_growing_rss_fails(script: ModuleType) -> None:
    over = script.check(samples(100, 5 * MiB, 32 * MiB, 0.0), 4 * MiB, 32 * MiB, 64 * MiB)
    assert [k for k, ok in over["checks"].items() if not ok] == ["device tier within budget"]
    growing = script.check(samples(100, 4 * MiB, 32 * MiB, 2 * MiB), 4 * MiB, 32 * MiB, 64 * MiB)
    assert [k for k, ok in growing["checks"].items() if not ok] == ["resident memory bounded"]
