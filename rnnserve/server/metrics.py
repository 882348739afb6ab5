"""Prometheus metrics under vLLM's names (so existing dashboards work) plus our own ``rnnserve:`` series.

Each app owns a ``CollectorRegistry``: two apps in one process (tests) never share series. Latency
histograms are observed by the server as outputs stream; engine gauges and token counters are read
from ``engine.stats()`` at scrape time, so they are exact and cost nothing between scrapes. The standard
``process_*`` series (resident memory, CPU seconds, open files; Linux) describe the server's process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so dashboards' quantiles read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error")  # error: the engine failed on the request


class _EngineCollector(Collector):
    """Engine gauges and counters, read from ``stats()`` on every scrape."""

    def __init__(self, model_name: str, stats: Callable[[], Any]) -> None:
        self._model_name = model_name
        self._stats = stats

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([self._model_name], float(value))
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([self._model_name], float(value))
        return c

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception:  # a scrape must not fail because the engine is starting or stopping
            logger.debug("engine stats unavailable", exc_info=True)
            return
        usage = float(s.state_pool_usage)
        # A model with attention layers reports its KV blocks' usage; a pure recurrent model has none,
        # and vLLM dashboards get its state pool's usage under the same names.
        blocks = getattr(s, "kv_cache_blocks", 0)
        cache_usage = s.kv_cache_blocks_used / blocks if blocks else usage
        yield self._gauge("vllm:num_requests_running", "Requests holding a state slot.", s.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting for a state slot.", s.num_waiting)
        yield self._gauge(
            "vllm:kv_cache_usage_perc", "KV-block usage (1 = full); the state pool's without KV.", cache_usage
        )
        yield self._gauge("vllm:gpu_cache_usage_perc", "As vllm:kv_cache_usage_perc (vLLM's older name).", cache_usage)
        yield self._counter("vllm:prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens_total)
        yield self._counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield self._gauge("rnnserve:state_pool_usage", "Fraction of state slots in use.", usage)
        yield self._gauge(
            "rnnserve:state_bytes_per_slot", "Bytes of recurrent state per sequence.", s.state_bytes_per_slot
        )
        yield self._gauge("rnnserve:state_pool_slots", "Usable state slots.", s.num_slots)
        yield self._gauge("rnnserve:state_pool_slots_used", "State slots in use.", s.slots_used)
        yield self._gauge("rnnserve:engine_step_seconds", "Duration of the last engine step.", s.last_step_seconds)
        yield self._counter("rnnserve:engine_steps", "Engine steps run.", s.num_steps)
        yield from self._prefix_cache(s)
        yield from self._kv_cache(s)

    def _kv_cache(self, s: Any) -> Iterator[Metric]:
        """The paged KV cache's size and preemptions (a model without attention layers has no blocks)."""
        if not getattr(s, "kv_cache_blocks", 0):
            return
        yield self._gauge("rnnserve:kv_cache_blocks", "KV-cache blocks.", s.kv_cache_blocks)
        yield self._gauge("rnnserve:kv_cache_blocks_used", "KV-cache blocks held by sequences.", s.kv_cache_blocks_used)
        yield self._gauge(
            "rnnserve:kv_cache_blocks_cached",
            "KV-cache blocks held only by prefix-cache entries (reclaimed before any preemption).",
            getattr(s, "kv_cache_blocks_cached", 0),
        )
        yield self._gauge(
            "rnnserve:kv_cache_bytes_per_token", "KV-cache bytes per token of a sequence.", s.kv_bytes_per_token
        )
        yield self._counter(
            "vllm:num_preemptions", "Requests preempted (recomputed later) for lack of KV blocks.", s.num_preemptions
        )

    def _prefix_cache(self, s: Any) -> Iterator[Metric]:
        """vLLM's prefix-cache counters (in tokens, as vLLM counts them) and the snapshot store's size."""
        if getattr(s, "prefix_cache_queries", None) is None:
            return
        yield self._counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries
        )
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens restored from the cache.", s.prefix_cache_hits)
        g = GaugeMetricFamily(
            "rnnserve:prefix_cache_bytes", "Bytes of state snapshots, by tier.", labels=["model_name", "tier"]
        )
        g.add_metric([self._model_name, "device"], float(s.prefix_cache_device_bytes))
        g.add_metric([self._model_name, "host"], float(s.prefix_cache_host_bytes))
        yield g
        yield self._gauge("rnnserve:prefix_cache_entries", "State snapshots in the cache.", s.prefix_cache_entries)
        yield self._counter(
            "rnnserve:prefix_cache_evictions", "Snapshots evicted (host tier full).", s.prefix_cache_evictions
        )


class ServerMetrics:
    """All series of one app, in its own registry."""

    def __init__(self, model_name: str, stats: Callable[[], Any] | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            labels,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token (same observations as inter_token_latency; vLLM's older name).",
            labels,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._success = Counter(
            "vllm:request_success",
            "Finished requests, by finish reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        for reason in FINISH_REASONS:
            self._success.labels(model_name, reason)
        if stats is not None:
            self.registry.register(_EngineCollector(model_name, stats))
        ProcessCollector(registry=self.registry)

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self._itl.observe(seconds)
        self._tpot.observe(seconds)

    def observe_finish(self, finish_reason: str, e2e_seconds: float) -> None:
        self._success.labels(self.model_name, finish_reason).inc()
        self._e2e.observe(e2e_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
